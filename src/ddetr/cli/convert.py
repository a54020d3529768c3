"""``ddetr convert SRC DST [--to ddetr|hf|official]``: rewrite a checkpoint in another layout."""

from __future__ import annotations

import argparse

from ddetr.cli.common import add_variant_hints


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="our .pth/.safetensors checkpoint, an official .pth, or a Hugging Face folder")
    parser.add_argument("dst", help="output file (ddetr: .pth or .safetensors; official: .pth) or folder (hf)")
    parser.add_argument("--to", choices=["ddetr", "hf", "official"], default="ddetr", help="output layout")
    add_variant_hints(parser)


def run(args: argparse.Namespace) -> None:
    from ddetr.interop.load import load_model, save_ddetr, save_hf, save_official

    model, cfg, meta = load_model(args.src, dilation=args.dilation, nheads=args.nheads, num_queries=args.num_queries)
    if args.to == "hf":
        save_hf(model, cfg, args.dst, meta)
    elif args.to == "official":
        save_official(model, cfg, args.dst, meta)
    else:
        save_ddetr(model, cfg, args.dst, meta["class_names"], meta["category_ids"], meta["val_size"],
                   meta["max_size"])
    m = cfg.model
    variant = ", ".join(f"{k}={getattr(m, k)}" for k in ("backbone", "num_feature_levels", "dilation",
                                                          "with_box_refine", "two_stage", "num_classes"))
    print(f"converted {args.src} ({meta['format']}) -> {args.dst} ({args.to}): {variant}")
