"""`ddetr train`: train a detector on a COCO-format dataset, or continue a run (`--resume OUTPUT/last.pth` alone)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from ddetr.cli.common import device_name, keep_freed_memory_on_cpu, positive_float, positive_int

DEFAULT_PRESET = "deformable-detr"
# option -> the DataConfig / TrainConfig field it sets
DATA_OPTIONS = {"data": "train", "val_data": "val", "train_images": "train_images",
                "train_annotations": "train_annotations", "val_images": "val_images",
                "val_annotations": "val_annotations"}
RUN_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "time_budget": "time_budget", "amp": "amp",
               "device": "device", "output": "output_dir"}


def add_args(p: argparse.ArgumentParser) -> None:
    from ddetr.models.config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"model variant and its training recipe (default: {DEFAULT_PRESET}; with --resume: the run's)")
    p.add_argument("--config", help="YAML/JSON training config (as written to OUTPUT/config.yaml); overrides --preset")
    p.add_argument("--data", help="training dataset DIR (DIR/annotations.json + DIR/images/)")
    p.add_argument("--val-data", help="validation dataset DIR, evaluated with COCO AP after each epoch")
    p.add_argument("--train-images", help="training images folder (instead of --data)")
    p.add_argument("--train-annotations", help="training COCO annotations JSON (instead of --data)")
    p.add_argument("--val-images", help="validation images folder (instead of --val-data)")
    p.add_argument("--val-annotations", help="validation COCO annotations JSON (instead of --val-data)")
    p.add_argument("--epochs", type=positive_int, help="number of epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, help="images per process and step (default: the recipe's)")
    p.add_argument("--time-budget", type=positive_float, help="seconds; stop when the next epoch would not fit")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"],
                   help="mixed precision; auto: bf16 where the device computes it natively; fp16 needs a GPU "
                        "(default: the recipe's)")
    p.add_argument("--device", type=device_name, help="auto, cpu, cuda or cuda:N (default: the recipe's, auto)")
    p.add_argument("--output", help="run folder for checkpoints and logs (default: the recipe's)")
    p.add_argument("--resume", help="continue the run of this checkpoint (OUTPUT/last.pth) with its saved config; "
                                    "only --epochs and --time-budget may change")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds a run: delete its checkpoints, logs and curves first")
    p.add_argument("--pretrained", help="start from weights (ddetr, official .pth or HF folder); class heads are "
                                        "re-initialised when the classes differ")
    p.add_argument("--match-class-names", action="store_true",
                   help="with --pretrained: initialise class rows whose names match the checkpoint's classes")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad images/annotations instead of failing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, converted to its type, e.g. --set optim.lr=2e-4 "
                        "--set detector.model.num_queries=100")


def _base_config(args: argparse.Namespace):
    from ddetr.engine.config import TrainConfig, train_preset
    from ddetr.models.config import load_config

    return load_config(args.config, TrainConfig) if args.config else train_preset(args.preset or DEFAULT_PRESET)


def _apply_options(cfg, args: argparse.Namespace) -> None:
    """The explicit options and ``--set`` overrides, in that order, then every field's checks."""
    from ddetr.models.config import set_field, validate

    for option, attr in DATA_OPTIONS.items():
        if getattr(args, option):
            setattr(cfg.data, attr, getattr(args, option))
    if args.skip_bad:
        cfg.data.skip_bad = True
    for option, attr in RUN_OPTIONS.items():
        if getattr(args, option) is not None:
            setattr(cfg, attr, getattr(args, option))
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        set_field(cfg, *item.split("=", 1))
    validate(cfg)


def _resumed_config(args: argparse.Namespace):
    """The run's saved config with the new length of training; any other option that differs is refused by name."""
    from ddetr.engine.run import config_diff, read_training_checkpoint, same_file, saved_config

    saved = saved_config(read_training_checkpoint(args.resume, mmap=True), args.resume)
    if args.config or args.preset:  # repeated from the original command: the data decided the class count
        given = _base_config(args)
        given.detector.model.num_classes = saved.detector.model.num_classes
    else:
        given = copy.deepcopy(saved)
    _apply_options(given, args)
    run_dir = Path(args.resume).parent
    if args.output and not same_file(args.output, run_dir):
        raise ValueError(f"--output {args.output}: the run of {args.resume} is in {run_dir}, where it continues "
                         "(start a new run from its weights with --pretrained instead)")
    differences = config_diff(saved, given)
    if differences:
        raise ValueError(f"--resume {args.resume}: differs from the run's saved config in {'; '.join(differences)}; "
                         "only --epochs and --time-budget may change (or start a new run with --pretrained)")
    saved.epochs, saved.time_budget, saved.output_dir = given.epochs, given.time_budget, str(run_dir)
    return saved


def load_train_config(args: argparse.Namespace):
    """The TrainConfig of this command: preset or config file plus options, or with --resume the saved one."""
    if args.match_class_names and not args.pretrained:
        raise ValueError("--match-class-names needs --pretrained (it maps the pretrained class rows by name)")
    if args.resume:
        return _resumed_config(args)
    cfg = _base_config(args)
    _apply_options(cfg, args)
    return cfg


def run(args: argparse.Namespace) -> int:
    from ddetr.engine.trainer import train
    from ddetr.evaluation.coco_eval import format_table

    cfg = load_train_config(args)
    keep_freed_memory_on_cpu(cfg.device)
    metrics = train(cfg, resume=args.resume, pretrained=args.pretrained, match_class_names=args.match_class_names,
                    overwrite=args.overwrite)
    if metrics:
        print(format_table(metrics))
    print(f"checkpoints and logs in {cfg.output_dir}")
    return 0
