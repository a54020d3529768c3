"""`ddetr bench predict`: images/s of `predict`'s loop (model prepared for inference, batched, images decoded ahead by
threads; fp32, and ``--amp bf16`` where the CPU computes bf16) against ddetr 0.1's loop (the model as trained with
every layer as written, one image at a time, decoded in the main thread), side by side in one process on the same
files and weights."""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddetr.engine.device import native_bf16
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


def layers_as_written(model: DeformableDETR) -> DeformableDETR:
    """A copy that runs every layer as written, as ddetr 0.1 did: the inference paths (the encoder in chunks, the
    decoder sampling before projecting) step aside for a forward hook on a module they bypass; these do nothing."""
    legacy = copy.deepcopy(model)
    bypassed = [child for layer in legacy.transformer.encoder.layers for child in layer.children()]
    bypassed += [layer.cross_attn.value_proj for layer in legacy.transformer.decoder.layers]
    for module in bypassed:
        module.register_forward_pre_hook(lambda module, args: None)
    return legacy


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
    legacy = layers_as_written(model)
    meta = label_meta(cfg.model.num_classes)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"{args.images} JPEGs per measurement, best of {args.repeats}")
    bf16 = native_bf16(torch.device("cpu"))
    if not bf16:
        print("bf16 not timed: this CPU has no bf16 instructions (AVX512-BF16 or AMX), PyTorch would emulate it")
    print(f"| shorter side | ddetr 0.1 loop (img/s) | predict loop fp32, batch {args.batch_size}, {args.workers} "
          "decode threads (img/s) | ratio | predict loop --amp bf16 (img/s) | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = write_jpegs(Path(tmp), args.images, size)
            as_trained = Detector(model, meta, size=size, max_size=size * 2)
            as_trained.model = legacy  # as ddetr 0.1: BatchNorm unfolded, NCHW, layers as written
            fp32 = Detector(model, meta, size=size, max_size=size * 2)
            batched_detectors = [fp32]
            if bf16:
                batched_detectors.append(Detector(model, meta, size=size, max_size=size * 2, amp="bf16"))
            for detector in (as_trained, *batched_detectors):
                one_at_a_time(detector, paths[:2])  # warm-up (kernel load, allocator)
            old, new, low = [], [], []
            for _ in range(args.repeats):
                old.append(one_at_a_time(as_trained, paths))
                for detector, rates in zip(batched_detectors, (new, low)):
                    rates.append(batched(detector, paths, args.batch_size, args.workers))
            low_cells = f"{max(low):.2f} | {max(low) / max(old):.2f}x" if low else "— | —"
            print(f"| {size} | {max(old):.2f} | {max(new):.2f} | {max(new) / max(old):.2f}x | {low_cells} |",
                  flush=True)


if __name__ == "__main__":
    main()
