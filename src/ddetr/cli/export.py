"""``ddetr export --checkpoint CKPT --format onnx --out model.onnx``: export, then check onnxruntime against PyTorch."""

from __future__ import annotations

import argparse

from ddetr.cli.common import add_variant_hints


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, an official .pth or a HF folder")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16 for GridSample)")
    parser.add_argument("--postprocess", action="store_true",
                        help="include top-k post-processing in the graph (extra input target_sizes)")
    parser.add_argument("--top-k", type=int, default=None, help="detections per image with --postprocess "
                        "(default: the checkpoint's top_k)")
    parser.add_argument("--static", action="store_true", help="fix batch and image size to the sample size")
    parser.add_argument("--size", type=int, nargs=2, default=(320, 416), metavar=("H", "W"),
                        help="sample image size traced (and the fixed size with --static)")
    add_variant_hints(parser)


def run(args: argparse.Namespace) -> None:
    import torch

    from ddetr.export.onnx import OnnxDetector, export_onnx
    from ddetr.interop import load_model
    from ddetr.models.postprocess import PostProcess

    model, cfg, meta = load_model(args.checkpoint, dilation=args.dilation, nheads=args.nheads,
                                  num_queries=args.num_queries)
    top_k = args.top_k or cfg.top_k
    size = tuple(args.size)
    path = export_onnx(model, args.out, opset=args.opset, dynamic=not args.static, postprocess=args.postprocess,
                       top_k=top_k, sample_size=size, meta=meta)
    # Check the exported graph against PyTorch on a fresh input (another size when dynamic).
    h, w = size if args.static else (size[0] + 32, size[1] - 32)
    images = torch.randn(1, 3, h, w)
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    with torch.no_grad():
        ref = model(images, masks)
    sizes = torch.tensor([[h, w]])
    got = OnnxDetector(path)(images, masks, sizes)
    if args.postprocess:
        ref = PostProcess(top_k)(ref, sizes)[0]
        got = {k: v[0] for k, v in got.items()}
    keys = ("scores", "boxes") if args.postprocess else ("pred_logits", "pred_boxes")
    diff = max(float((got[k] - ref[k]).abs().max()) for k in keys)
    extra = f", top-{top_k} post-processing" if args.postprocess else ""
    print(f"exported {args.checkpoint} -> {path} (opset {args.opset}{extra}); onnxruntime vs PyTorch at {h}x{w}: "
          f"max abs diff {diff:.2e}")
