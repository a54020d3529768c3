"""`ddetr eval`: COCO AP of a checkpoint on a COCO-format dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddetr.cli.common import (
    add_amp_arg,
    add_checkpoint_args,
    add_variant_hints,
    keep_freed_memory_on_cpu,
    positive_int,
)


def add_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    p.add_argument("--data", help="dataset DIR (DIR/annotations.json + DIR/images/)")
    p.add_argument("--images", help="images folder (instead of --data)")
    p.add_argument("--annotations", help="COCO annotations JSON (instead of --data)")
    p.add_argument("--size", type=positive_int,
                   help="shorter side at inference (default: the checkpoint's val size or 800)")
    p.add_argument("--max-size", type=positive_int, help="longer side limit (default: the checkpoint's or 1333)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per forward pass")
    p.add_argument("--out", help="write metrics (JSON) and COCO results (JSON) into this folder")
    add_amp_arg(p)
    add_variant_hints(p)


def run(args: argparse.Namespace) -> int:
    from ddetr.data.coco import CocoDetection
    from ddetr.data.transforms import val_transforms
    from ddetr.engine.data import make_loader, resolve_paths
    from ddetr.engine.device import AMP_DTYPES, resolve_amp, resolve_device
    from ddetr.engine.evaluate import evaluate
    from ddetr.engine.state import json_safe
    from ddetr.evaluation.coco_eval import format_table
    from ddetr.interop import load_model
    from ddetr.models.inference_ready import prepare_for_inference
    from ddetr.models.postprocess import PostProcess

    if not args.data and not (args.images and args.annotations):
        raise ValueError("no data to evaluate on: give --data DIR, or both --images and --annotations")
    images, ann = resolve_paths(args.data, args.images, args.annotations, "eval")
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    keep_freed_memory_on_cpu(args.device)
    model, cfg, meta = load_model(args.checkpoint, dilation=args.dilation, nheads=args.nheads,
                                  num_queries=args.num_queries)
    size, max_size = args.size or meta["val_size"], args.max_size or meta["max_size"]
    dataset = CocoDetection(images, ann, val_transforms(size=size, max_size=max_size), allow_empty=True)
    loader = make_loader(dataset, args.batch_size, False, 0, 0)
    model = prepare_for_inference(model).to(device)
    metrics, results = evaluate(model, PostProcess(cfg.top_k), loader, device, meta["category_ids"], AMP_DTYPES[amp])
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
        (out / "results.json").write_text(json.dumps(results))
        print(f"wrote {out / 'metrics.json'} and {out / 'results.json'}")
    return 0
