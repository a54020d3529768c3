"""Arguments and actions of each `ddetr` command (thin: the work lives in the library)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("ddetr")


# ---- train -----------------------------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
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


def keep_freed_memory_on_cpu(device: str) -> None:
    """CPU runs reuse freed memory between steps instead of page-faulting it afresh (see ddetr.engine.malloc)."""
    from ddetr.engine.malloc import keep_freed_memory
    from ddetr.engine.trainer import pick_device

    if pick_device(device).type == "cpu":
        keep_freed_memory()


def run_train(args: argparse.Namespace) -> int:
    from ddetr.engine.trainer import train
    from ddetr.evaluation.coco_eval import format_table

    cfg = load_train_config(args)
    keep_freed_memory_on_cpu(cfg.device)
    metrics = train(cfg, resume=args.resume, pretrained=args.pretrained, match_class_names=args.match_class_names)
    if metrics:
        print(format_table(metrics))
    print(f"checkpoints and logs in {cfg.output_dir}")
    return 0


# ---- eval ------------------------------------------------------------------------------------------------------------
def _add_checkpoint(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required,
                   help="ddetr checkpoint, official .pth or Hugging Face model folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p)
    p.add_argument("--data", help="dataset DIR (DIR/annotations.json + DIR/images/)")
    p.add_argument("--images", help="images folder (instead of --data)")
    p.add_argument("--annotations", help="COCO annotations JSON (instead of --data)")
    p.add_argument("--size", type=int, help="shorter side at inference (default: the checkpoint's val size or 800)")
    p.add_argument("--max-size", type=int, help="longer side limit (default: the checkpoint's or 1333)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--out", help="write metrics (JSON) and COCO results (JSON) into this folder")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ddetr.data.coco import CocoDetection
    from ddetr.data.transforms import val_transforms
    from ddetr.engine.data import make_loader, resolve_paths
    from ddetr.engine.evaluate import evaluate
    from ddetr.evaluation.coco_eval import format_table
    from ddetr.interop import load_model
    from ddetr.models.postprocess import PostProcess

    keep_freed_memory_on_cpu(args.device)
    model, cfg, meta = load_model(args.checkpoint)
    images, ann = resolve_paths(args.data, args.images, args.annotations, "eval")
    size = args.size or meta.get("val_size") or 800
    max_size = args.max_size or meta.get("max_size") or 1333
    dataset = CocoDetection(images, ann, val_transforms(size=size, max_size=max_size))
    if dataset.num_classes != cfg.model.num_classes and meta.get("category_ids") is None:
        log.warning("dataset has %d classes, model %d", dataset.num_classes, cfg.model.num_classes)
    device = torch.device(args.device)
    loader = make_loader(dataset, args.batch_size, False, 0, 0)
    metrics, results = evaluate(model.to(device), PostProcess(cfg.top_k), loader, device)
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "results.json").write_text(json.dumps(results))
        print(f"wrote {out / 'metrics.json'} and {out / 'results.json'}")
    return 0


# ---- predict ---------------------------------------------------------------------------------------------------------
def add_predict_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p, required=False)
    p.add_argument("--onnx", help="run an exported ONNX model through onnxruntime instead of a checkpoint")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score to keep a detection")
    p.add_argument("--size", type=int, help="shorter side at inference (default: the checkpoint's)")
    p.add_argument("--out", default="predictions", help="folder for results.json, coco_results.json and drawn images")
    p.add_argument("--no-draw", action="store_true", help="only write JSON")


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ddetr.inference import Detector, list_images, read_image

    if bool(args.checkpoint) == bool(args.onnx):
        raise ValueError("give exactly one of --checkpoint or --onnx")
    kwargs = {"size": args.size} if args.size else {}
    if args.onnx:
        detector = Detector.from_onnx(args.onnx, **kwargs)
    else:
        detector = Detector.from_checkpoint(args.checkpoint, device=args.device, **kwargs)
    paths = list_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {args.inputs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, coco = [], []
    names = detector.class_names
    for index, path in enumerate(tqdm(paths, desc="predict")):
        image = read_image(path)
        det = detector(image, threshold=args.threshold)
        boxes = det["boxes"].tolist()
        labels = [int(x) for x in det["labels"]]
        scores = [round(float(s), 5) for s in det["scores"]]
        records.append({"file": str(path), "width": image.width, "height": image.height, "detections": [
            {"box_xyxy": [round(v, 2) for v in b], "score": s, "label": lab,
             **({"name": names[lab]} if names else {})} for b, s, lab in zip(boxes, scores, labels)]})
        cat_ids = detector.category_ids
        coco += [{"image_id": index, "file_name": path.name, "category_id": cat_ids[lab] if cat_ids else lab,
                  "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                  "score": s} for b, s, lab in zip(boxes, scores, labels)]
        if not args.no_draw:
            from ddetr.viz.draw import draw_detections

            draw_detections(image, det, names).save(out / f"{path.stem}_pred.png")
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "coco_results.json").write_text(json.dumps(coco))
    total = sum(len(r["detections"]) for r in records)
    print(f"{total} detections in {len(records)} images -> {out}")
    return 0


# ---- delegated commands ---------------------------------------------------------------------------------------
def _delegate(module: str, add_name: str, run_name: str):
    """(add_args, run) for a command whose options and action live in ``module`` (imported only when used)."""

    def add(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), add_name)(p)

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), run_name)(args) or 0

    return add, run


add_export_args, run_export = _delegate("ddetr.export.cli", "add_export_args", "run_export")
add_convert_args, run_convert = _delegate("ddetr.interop.cli", "add_convert_args", "run_convert")
add_visualize_args, run_visualize = _delegate("ddetr.viz.cli", "add_visualize_args", "run_visualize")
add_synth_args, run_synth = _delegate("ddetr.data.synthetic", "add_synth_args", "run_synth")
add_bench_args, run_bench = _delegate("ddetr.benchmark", "add_bench_args", "run_bench")


# ---- demo ------------------------------------------------------------------------------------------------------------
def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (data in OUT/data, checkpoints, predictions)")
    p.add_argument("--time-budget", type=float, default=450.0, help="training seconds (the whole job stays < 10 min)")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--num-val", type=int, default=200, help="synthetic validation images")


def run_demo(args: argparse.Namespace) -> int:
    from ddetr.data.synthetic import generate
    from ddetr.engine.config import train_preset
    from ddetr.engine.trainer import train
    from ddetr.evaluation.coco_eval import format_table

    start = time.monotonic()
    out = Path(args.out)
    data = out / "data"
    if not (data / "val" / "annotations.json").is_file():
        print(f"writing the synthetic dataset to {data} ...")
        generate(data, num_train=args.num_train, num_val=args.num_val, image_size=256, seed=0)
    cfg = train_preset("demo")
    cfg.data.train, cfg.data.val = str(data / "train"), str(data / "val")
    cfg.output_dir = str(out)
    cfg.time_budget = args.time_budget
    keep_freed_memory_on_cpu(cfg.device)
    resume = out / "last.pth"
    metrics = train(cfg, resume=str(resume) if resume.is_file() else None)
    print(format_table(metrics))
    best = out / "best.pth" if (out / "best.pth").is_file() else out / "last.pth"
    ns = argparse.Namespace(checkpoint=str(best), onnx=None, device="cpu",
                            inputs=[str(p) for p in sorted((data / "val" / "images").iterdir())[:8]],
                            threshold=0.3, size=None, out=str(out / "predictions"), no_draw=False)
    run_predict(ns)
    print(f"demo finished in {time.monotonic() - start:.0f}s: curves {out / 'curves.png'}, "
          f"drawn predictions in {out / 'predictions'}")
    return 0
