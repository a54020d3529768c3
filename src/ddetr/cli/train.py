"""`ddetr train`: train a detector on a COCO-format dataset."""

from __future__ import annotations

import argparse

from ddetr.cli.common import keep_freed_memory_on_cpu


def add_args(p: argparse.ArgumentParser) -> None:
    from ddetr.models.config import PRESETS

    p.add_argument("--preset", default="deformable-detr", choices=sorted(PRESETS),
                   help="model variant (and its training recipe)")
    p.add_argument("--config", help="YAML/JSON training config (as written to OUTPUT/config.yaml); overrides --preset")
    p.add_argument("--data", help="training dataset DIR (DIR/annotations.json + DIR/images/)")
    p.add_argument("--val-data", help="validation dataset DIR, evaluated with COCO AP after each epoch")
    p.add_argument("--train-images", help="training images folder (instead of --data)")
    p.add_argument("--train-annotations", help="training COCO annotations JSON (instead of --data)")
    p.add_argument("--val-images", help="validation images folder (instead of --val-data)")
    p.add_argument("--val-annotations", help="validation COCO annotations JSON (instead of --val-data)")
    p.add_argument("--epochs", type=int, help="number of epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per process and step (default: the recipe's)")
    p.add_argument("--time-budget", type=float, help="seconds; stop when the next epoch would not fit")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"],
                   help="mixed precision; auto: bf16 where the device computes it natively (default: none)")
    p.add_argument("--output", help="run folder for checkpoints and logs (default: the recipe's)")
    p.add_argument("--resume", help="continue a run from its checkpoint (e.g. OUTPUT/last.pth)")
    p.add_argument("--pretrained", help="start from weights (ddetr, official .pth or HF folder); class heads are "
                                        "re-initialised when the classes differ")
    p.add_argument("--match-class-names", action="store_true",
                   help="with --pretrained: initialise class rows whose names match the checkpoint's classes")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad images/annotations instead of failing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=1e-4 --set detector.model.num_queries=100")


def load_train_config(args: argparse.Namespace):
    from ddetr.engine.config import TrainConfig, train_preset
    from ddetr.models.config import load_config, set_field

    cfg = load_config(args.config, TrainConfig) if args.config else train_preset(args.preset)
    d = cfg.data
    for attr, value in (("train", args.data), ("val", args.val_data), ("train_images", args.train_images),
                        ("train_annotations", args.train_annotations), ("val_images", args.val_images),
                        ("val_annotations", args.val_annotations)):
        if value:
            setattr(d, attr, value)
    if args.skip_bad:
        d.skip_bad = True
    for attr, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("time_budget", args.time_budget),
                        ("amp", args.amp), ("output_dir", args.output)):
        if value is not None:
            setattr(cfg, attr, value)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        set_field(cfg, *item.split("=", 1))
    cfg.__post_init__()
    return cfg


def run(args: argparse.Namespace) -> int:
    from ddetr.engine.trainer import train
    from ddetr.evaluation.coco_eval import format_table

    cfg = load_train_config(args)
    keep_freed_memory_on_cpu(cfg.device)
    metrics = train(cfg, resume=args.resume, pretrained=args.pretrained, match_class_names=args.match_class_names)
    if metrics:
        print(format_table(metrics))
    print(f"checkpoints and logs in {cfg.output_dir}")
    return 0
