"""`ddetr demo`: synthetic data -> train the demo preset on CPU -> evaluate -> draw predictions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddetr.cli.common import keep_freed_memory_on_cpu


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (data in OUT/data, checkpoints, predictions)")
    p.add_argument("--time-budget", type=float, default=450.0, help="training seconds (the whole job stays < 10 min)")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--num-val", type=int, default=200, help="synthetic validation images")


def run(args: argparse.Namespace) -> int:
    from ddetr.data.synthetic import generate
    from ddetr.engine.config import train_preset
    from ddetr.engine.trainer import train
    from ddetr.evaluation.coco_eval import format_table
    from ddetr.inference import Detector
    from ddetr.viz.draw import draw_detections

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
    detector = Detector.from_checkpoint(best)
    drawn = out / "predictions"
    drawn.mkdir(exist_ok=True)
    for result in detector.predict_files(sorted((data / "val" / "images").iterdir())[:8], threshold=0.3):
        draw_detections(result.image, result.detections).save(drawn / f"{result.path.stem}_pred.png")
    print(f"demo finished in {time.monotonic() - start:.0f}s: curves {out / 'curves.png'}, "
          f"drawn predictions in {out / 'predictions'}")
    return 0
