"""`ddetr predict`: detect objects in images; write JSON results and drawn images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddetr.cli.common import add_checkpoint_args


def add_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p, required=False)
    p.add_argument("--onnx", help="run an exported ONNX model through onnxruntime instead of a checkpoint")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score to keep a detection")
    p.add_argument("--size", type=int, help="shorter side at inference (default: the checkpoint's)")
    p.add_argument("--out", default="predictions", help="folder for results.json, coco_results.json and drawn images")
    p.add_argument("--no-draw", action="store_true", help="only write JSON")


def run(args: argparse.Namespace) -> int:
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
