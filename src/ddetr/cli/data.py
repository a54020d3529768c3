"""`ddetr data synth`: write the built-in synthetic dataset (COCO JSON + images)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of `ddetr data synth`."""
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--num-train", type=int, default=1000, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="validation images")
    parser.add_argument("--image-size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--min-objects", type=int, default=2, help="fewest objects per image")
    parser.add_argument("--max-objects", type=int, default=8, help="most objects per image")


def run(args: argparse.Namespace) -> None:
    """Entry point of `ddetr data synth`."""
    from ddetr.data.synthetic import generate

    counts = generate(
        args.out, args.num_train, args.num_val, args.image_size, args.seed, args.min_objects, args.max_objects
    )
    for split, n in counts.items():
        print(f"{Path(args.out) / split}: {getattr(args, f'num_{split}')} images, {n} boxes")
