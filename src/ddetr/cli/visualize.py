"""`ddetr visualize`: draw the top detections of images and where each one's decoder queries looked."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddetr.cli.common import add_checkpoint_args, add_variant_hints, non_negative_int, positive_int


def _layer(text: str) -> int | None:
    """'all' -> None (every layer), else a layer index (negative counts from the end)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or 'all', got {text!r}") from None


def add_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--top", type=positive_int, default=3,
                   help="number of best detections to draw, with one attention figure each")
    p.add_argument("--layer", type=_layer, default=-1, metavar="K|all",
                   help="attention layer to draw (negative: from the end), or 'all': one panel per layer")
    p.add_argument("--encoder-pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="also draw the encoder self-attention of this pixel (original-image coordinates)")
    p.add_argument("--encoder-level", type=non_negative_int, default=0,
                   help="feature level of the --encoder-pixel query")
    p.add_argument("--color-by", choices=["level", "head"], default="level", help="colour sampling points by")
    p.add_argument("--size", type=positive_int, help="shorter side at inference (default: the model's)")
    p.add_argument("--out", default="visualize", help="folder for the PNG files")
    add_variant_hints(p)


def run(args: argparse.Namespace) -> int:
    from ddetr.engine.device import resolve_device
    from ddetr.inference import list_images, preprocess, read_image, to_uint8_tensor
    from ddetr.interop import load_model
    from ddetr.viz.attention import (
        plot_pixel_attention,
        plot_query_attention,
        record_attention,
        select_layers,
        top_detections,
    )
    from ddetr.viz.draw import draw_detections

    paths = list_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {args.inputs}")
    device = resolve_device(args.device)
    model, _, meta = load_model(args.checkpoint, dilation=args.dilation, nheads=args.nheads,
                                num_queries=args.num_queries)
    model = model.to(device).eval()
    names = meta["class_names"]
    size, max_size = args.size or meta["val_size"], meta["max_size"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        image = read_image(path)
        pixels = preprocess(to_uint8_tensor(image), size, max_size)[None].to(device)
        canvas = tuple(pixels.shape[-2:])
        outputs, records = record_attention(model, pixels)
        det = top_detections(outputs, (image.height, image.width), args.top)
        target = out / f"{path.stem}_detections.png"
        draw_detections(image, det, names).save(target)
        written.append(target)
        decoder = select_layers(records, "decoder", args.layer)
        for rank, (query, label, score, box) in enumerate(zip(det["queries"].tolist(), det["labels"].tolist(),
                                                             det["scores"].tolist(), det["boxes"])):
            name = names[label] if names else str(label)
            title = f"{path.name}: #{rank + 1} {name} {score:.2f} (query {query})"
            fig = plot_query_attention(image, decoder, query, canvas, box=box, color_by=args.color_by,
                                       title=title)
            target = out / f"{path.stem}_det{rank + 1}_query{query}.png"
            fig.savefig(target, dpi=100)
            written.append(target)
        if args.encoder_pixel:
            x, y = args.encoder_pixel
            encoder = select_layers(records, "encoder", args.layer)
            title = f"{path.name}: encoder attention of pixel ({x:g}, {y:g}), level {args.encoder_level}"
            fig = plot_pixel_attention(image, encoder, (x, y), canvas, level=args.encoder_level,
                                       color_by=args.color_by, title=title)
            target = out / f"{path.stem}_encoder_x{x:g}_y{y:g}.png"
            fig.savefig(target, dpi=100)
            written.append(target)
    print(f"wrote {len(written)} PNG files for {len(paths)} images -> {out}")
    return 0
