"""`ddetr bench predict`: images/s of `predict`'s loop (batched, decoded ahead by threads) against one image at a
time with decoding in the main thread (ddetr 0.1's loop), side by side in one process on the same files and model."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddetr.inference import Detector, read_image
from ddetr.interop.meta import label_meta
from ddetr.models import DeformableDETR, preset


def write_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    """Random-texture JPEGs of size x (4/3 size), so decoding costs what a photo's would."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size * 4 // 3, 3), dtype=np.uint8)
        paths.append(folder / f"{i:04d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def one_at_a_time(detector: Detector, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        detector(read_image(path), threshold=0.3)
    return len(paths) / (time.perf_counter() - start)


def batched(detector: Detector, paths: list[Path], batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    for _ in detector.predict_files(paths, threshold=0.3, batch_size=batch_size, workers=workers):
        pass
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="demo", help="model preset (random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 800], help="shorter image sides")
    parser.add_argument("--images", type=int, default=24, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is kept")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset, pretrained_backbone="none")
    model = DeformableDETR(cfg.model).eval()
    print(f"| shorter side | one at a time (img/s) | predict loop, batch {args.batch_size}, {args.workers} decode "
          "threads (img/s) | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = write_jpegs(Path(tmp), args.images, size)
            detector = Detector(model, label_meta(cfg.model.num_classes), size=size, max_size=size * 2)
            one_at_a_time(detector, paths[:2])  # warm-up (kernel load, allocator)
            old, new = [], []
            for _ in range(args.repeats):
                old.append(one_at_a_time(detector, paths))
                new.append(batched(detector, paths, args.batch_size, args.workers))
            print(f"| {size} | {max(old):.2f} | {max(new):.2f} | {max(new) / max(old):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
