"""``ddetr convert SRC DST [--to ddetr|hf|official]``: rewrite a checkpoint in another layout."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="our .pth/.safetensors checkpoint, an official .pth, or a Hugging Face folder")
    parser.add_argument("dst", help="output file (ddetr: .pth or .safetensors; official: .pth) or folder (hf)")
    parser.add_argument("--to", choices=["ddetr", "hf", "official"], default="ddetr", help="output layout")
    parser.add_argument("--dilation", action="store_true",
                        help="the official checkpoint is a DC5 model (its keys cannot show it)")
    parser.add_argument("--nheads", type=int, default=None, help="official checkpoints: attention heads (8)")
    parser.add_argument("--num-queries", type=int, default=None,
                        help="official two-stage checkpoints: number of proposals (300)")


def run(args: argparse.Namespace) -> None:
    from ddetr.interop.load import load_model, save_ddetr, save_hf, save_official

    model, cfg, meta = load_model(args.src, dilation=args.dilation or None, nheads=args.nheads,
                                  num_queries=args.num_queries)
    names = meta.get("class_names")
    if args.to == "hf":
        save_hf(model, cfg, args.dst, dict(enumerate(names)) if names else None)
    elif args.to == "official":
        save_official(model, cfg, args.dst)
    else:
        save_ddetr(model, cfg, args.dst, names, meta.get("category_ids"))
    m = cfg.model
    variant = ", ".join(f"{k}={getattr(m, k)}" for k in ("backbone", "num_feature_levels", "dilation",
                                                          "with_box_refine", "two_stage", "num_classes"))
    print(f"converted {args.src} ({meta['format']}) -> {args.dst} ({args.to}): {variant}")
