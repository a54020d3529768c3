"""`ddetr predict`: detect objects in images; write JSON results and drawn images."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ddetr.cli.common import (
    add_amp_arg,
    add_checkpoint_args,
    add_variant_hints,
    keep_freed_memory_on_cpu,
    positive_int,
    probability,
)


def add_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p, required=False)
    p.add_argument("--onnx", help="run an exported ONNX model through onnxruntime instead of a checkpoint")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--threshold", type=probability, default=0.3, help="minimum score to keep a detection, in [0, 1]")
    p.add_argument("--size", type=positive_int, help="shorter side at inference (default: the model's)")
    p.add_argument("--max-size", type=positive_int, help="longer side limit at inference (default: the model's)")
    p.add_argument("--annotations", help="COCO JSON listing these images: coco_results.json then carries its image "
                                         "ids (matched by file name), ready for pycocotools")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass")
    p.add_argument("--workers", type=positive_int, default=2, help="threads decoding and resizing images ahead")
    p.add_argument("--out", default="predictions", help="folder for results.json, coco_results.json and drawn images")
    p.add_argument("--no-draw", action="store_true", help="only write JSON")
    add_amp_arg(p)
    add_variant_hints(p)


def image_ids_by_name(annotations: str | Path) -> dict[str, int]:
    """file_name -> image id of a COCO JSON (also by base name when that is unambiguous)."""
    path = Path(annotations)
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        pairs = [(str(im["file_name"]), int(im["id"])) for im in images]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO annotation file with images[].file_name and id ({exc!r})") from None
    ids = dict(pairs)
    base = {}
    for name, image_id in pairs:
        base.setdefault(Path(name).name, []).append(image_id)
    ids.update({name: found[0] for name, found in base.items() if len(found) == 1 and name not in ids})
    return ids


def _lookup_id(path: Path, ids: dict[str, int], roots: list[Path]) -> int | None:
    for root in roots:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            continue
        if rel in ids:
            return ids[rel]
    return ids.get(path.name)


def coco_records(det: dict[str, Any], image_id: int | None, file_name: str,
                 category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO result dicts (xywh, full precision) of one image: with its dataset image id, else with its file name."""
    from ddetr.evaluation.coco_eval import to_coco_results

    results = to_coco_results([det], [0 if image_id is None else image_id], category_ids)
    if image_id is None:
        results = [{"file_name": file_name, **{k: v for k, v in r.items() if k != "image_id"}} for r in results]
    return results


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ddetr.inference import Detector, list_images

    if bool(args.checkpoint) == bool(args.onnx):
        raise ValueError("give exactly one of --checkpoint or --onnx")
    if args.onnx and args.amp != "none":
        raise ValueError("--amp applies to --checkpoint; an ONNX model runs in the precision it was exported in")
    paths = list_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {args.inputs}")
    ids = image_ids_by_name(args.annotations) if args.annotations else None
    keep_freed_memory_on_cpu("cpu" if args.onnx else args.device)  # also refuses a device that is not here
    if args.onnx:
        detector = Detector.from_onnx(args.onnx, size=args.size, max_size=args.max_size)
    else:
        detector = Detector.from_checkpoint(args.checkpoint, device=args.device, size=args.size,
                                            max_size=args.max_size, amp=args.amp, dilation=args.dilation,
                                            nheads=args.nheads, num_queries=args.num_queries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roots = [Path(x) for x in args.inputs if Path(x).is_dir()]
    records, coco, failed, unlisted = [], [], [], []
    start = time.monotonic()
    bar = tqdm(detector.predict_files(paths, args.threshold, args.batch_size, args.workers), total=len(paths),
               desc="predict", unit="img")
    for result in bar:
        if result.error is not None:
            failed.append(result.error)
            tqdm.write(f"ddetr predict: skipped: {result.error}", file=sys.stderr)
            continue
        det, image, path = result.detections, result.image, result.path
        records.append({"file": str(path), "width": image.width, "height": image.height, "detections": [
            {"box_xyxy": [round(v, 2) for v in box], "score": round(float(score), 5), "category_id": int(cat),
             "name": name} for box, score, cat, name in
            zip(det["boxes"].tolist(), det["scores"], det["category_ids"], det["names"])]})
        image_id = None
        if ids is not None:
            image_id = _lookup_id(path, ids, roots)
            if image_id is None:
                unlisted.append(path.name)
                continue
        coco += coco_records(det, image_id, path.name, detector.category_ids)
        if not args.no_draw:
            from ddetr.viz.draw import draw_detections

            draw_detections(image, det).save(out / f"{path.stem}_pred.png")
    seconds = time.monotonic() - start
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "coco_results.json").write_text(json.dumps(coco))
    total = sum(len(r["detections"]) for r in records)
    print(f"{total} detections in {len(records)} images ({len(records) / max(seconds, 1e-9):.1f} images/s) -> {out}")
    if unlisted:
        print(f"ddetr predict: warning: {len(unlisted)} images are not in {args.annotations} and are left out of "
              f"coco_results.json: {', '.join(unlisted[:10])}", file=sys.stderr)
    if failed:
        print(f"ddetr predict: error: {len(failed)} of {len(paths)} images could not be read (named above); the "
              "others' results are written", file=sys.stderr)
        return 1
    return 0
