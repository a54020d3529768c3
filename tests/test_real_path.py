"""The path a real user takes: published-format COCO heads (91 logits, index = category id), sparse category ids,
`eval` vs `predict --annotations` scored by pycocotools, ONNX vs checkpoint predictions, metadata through `convert`.

The checkpoints are written here in the official and Hugging Face layouts; a class bias makes one COCO class (18,
"dog") win every query, and the ground truth is placed on the model's own top boxes, so a wrong label -> id mapping
scores 0 and a right one scores high.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr.cli.main import main
from ddetr.evaluation.coco_eval import METRIC_NAMES
from ddetr.inference import Detector
from ddetr.interop import load_model, save_ddetr, save_hf, save_official
from ddetr.interop.meta import label_meta
from ddetr.models import DeformableDETR, ModelConfig

DOG = 18
TINY = dict(backbone="resnet18", pretrained_backbone="none", num_feature_levels=3, hidden_dim=32, nheads=4,
            enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10, enc_n_points=2, dec_n_points=2,
            dropout=0.0)
SIZE = ["--size", "64", "--max-size", "100"]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def tiny_model(num_classes: int, winner: int, seed: int = 0) -> DeformableDETR:
    torch.manual_seed(seed)
    model = DeformableDETR(ModelConfig(num_classes=num_classes, **TINY)).eval()
    with torch.no_grad():
        model.class_embed[0].bias.fill_(-8.0)
        model.class_embed[0].bias[winner] = 3.0
        model.bbox_embed[0].layers[-1].bias.copy_(torch.tensor([0.0, 0.0, -1.0, -1.0]))
    return model


def write_images(folder: Path, n: int = 3, size: tuple[int, int] = (64, 80)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"{i:012d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def ground_truth_on_top_boxes(detector: Detector, images: Path, names: list[str], ids: list[int], category: int,
                              categories: list[tuple[int, str]]) -> dict:
    """A COCO dict whose boxes are the detector's best box per image (category ``category``), ids sparse."""
    annotations = []
    for name, image_id in zip(names, ids):
        det = detector(str(images / name))
        x0, y0, x1, y1 = det["boxes"][0].tolist()
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    annotations.append({"id": 99, "image_id": ids[0], "category_id": 1, "bbox": [1, 1, 10, 12], "area": 120,
                        "iscrowd": 0})  # a person the model never predicts
    h, w = np.asarray(Image.open(images / names[0])).shape[:2]
    return {"images": [{"id": i, "file_name": n, "width": w, "height": h} for n, i in zip(names, ids)],
            "annotations": annotations, "categories": [{"id": c, "name": n} for c, n in categories]}


def pycocotools_metrics(gt_file: Path, results: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.fixture(scope="module")
def coco_mini(tmp_path_factory) -> dict:
    """An official 91-logit checkpoint with args, the same weights as an HF hub-style folder, and a COCO-style
    dataset with sparse category ids up to 90 and image ids that are not positions."""
    root = tmp_path_factory.mktemp("coco_mini")
    model = tiny_model(91, DOG)
    cfg = model.cfg
    save_official(model, cfg, root / "official.pth")
    (root / "official.json").unlink()  # as released: no ddetr metadata next to it
    save_hf(model, cfg, root / "hf", label_meta(91))
    config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                         if not k.startswith("ddetr_")}))  # as on the hub
    images = root / "images"
    names = write_images(images)
    detector = Detector.from_checkpoint(root / "official.pth", size=64, max_size=100)
    categories = [(1, "person"), (DOG, "dog"), (44, "bottle"), (90, "toothbrush")]
    gt = ground_truth_on_top_boxes(detector, images, names, [397133, 37777, 252219], DOG, categories)
    (root / "instances.json").write_text(json.dumps(gt))
    return {"root": root, "images": images, "gt": root / "instances.json"}


def test_eval_reports_true_coco_ids_for_official_and_hf(coco_mini):
    root, metrics = coco_mini["root"], {}
    for name, ckpt in (("official", root / "official.pth"), ("hf", root / "hf")):
        code, out, err = run("eval", "--checkpoint", ckpt, "--images", coco_mini["images"], "--annotations",
                             coco_mini["gt"], *SIZE, "--out", root / f"eval_{name}")
        assert code == 0, err
        results = json.loads((root / f"eval_{name}" / "results.json").read_text())
        best = sorted(results, key=lambda r: -r["score"])[:9]
        assert {r["category_id"] for r in best} == {DOG}  # label 18 is COCO id 18, whatever the dataset's order
        assert {r["image_id"] for r in results} == {397133, 37777, 252219}
        metrics[name] = json.loads((root / f"eval_{name}" / "metrics.json").read_text())
    assert metrics["official"] == metrics["hf"]
    # AP averages person (never predicted: 0) and dog (the top box of every image is its ground truth).
    assert metrics["official"]["AP50"] > 0.4


def test_predict_with_annotations_scores_like_eval(coco_mini):
    root = coco_mini["root"]
    code, _, err = run("predict", "--checkpoint", root / "official.pth", coco_mini["images"], "--annotations",
                       coco_mini["gt"], "--threshold", "0", "--no-draw", *SIZE, "--out", root / "pred")
    assert code == 0, err
    coco = json.loads((root / "pred" / "coco_results.json").read_text())
    assert {r["image_id"] for r in coco} == {397133, 37777, 252219}
    eval_metrics = json.loads((root / "eval_official" / "metrics.json").read_text())
    stats = pycocotools_metrics(coco_mini["gt"], coco)
    for name, value in zip(METRIC_NAMES, stats):
        expected = eval_metrics[name]
        assert (value < 0 and expected is None) or value == pytest.approx(expected, abs=1e-12), name  # null: no GT


def test_bf16_eval_and_predict_agree_with_fp32(coco_mini, tmp_path):
    """--amp bf16 (autocast) gives the same top detections as fp32 and an AP within a point of it."""
    root = coco_mini["root"]
    code, _, err = run("eval", "--checkpoint", root / "official.pth", "--images", coco_mini["images"],
                       "--annotations", coco_mini["gt"], *SIZE, "--amp", "bf16", "--out", tmp_path / "eval")
    assert code == 0, err
    fp32 = json.loads((root / "eval_official" / "metrics.json").read_text())
    bf16 = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(bf16["AP50"] - fp32["AP50"]) <= 0.01 and abs(bf16["AP"] - fp32["AP"]) <= 0.01
    for amp in ("none", "bf16"):
        code, _, err = run("predict", "--checkpoint", root / "official.pth", coco_mini["images"], "--threshold",
                           "0.5", "--no-draw", *SIZE, "--amp", amp, "--out", tmp_path / amp)
        assert code == 0, err
    a, b = (json.loads((tmp_path / amp / "results.json").read_text()) for amp in ("none", "bf16"))
    for ra, rb in zip(a, b):
        top_a, top_b = ra["detections"][0], rb["detections"][0]
        assert top_a["category_id"] == top_b["category_id"] == DOG
        assert max(abs(x - y) for x, y in zip(top_a["box_xyxy"], top_b["box_xyxy"])) <= 2.0  # pixels
        assert abs(top_a["score"] - top_b["score"]) <= 0.03


def test_predict_refuses_amp_with_onnx_in_one_line(tmp_path):
    code, _, err = run("predict", "--onnx", tmp_path / "m.onnx", tmp_path, "--amp", "bf16")
    assert code == 2 and "--amp applies to --checkpoint" in err and "Traceback" not in err


def test_predict_without_annotations_writes_file_names_not_invented_ids(coco_mini, tmp_path):
    root = coco_mini["root"]
    code, _, err = run("predict", "--checkpoint", root / "hf", coco_mini["images"], "--threshold", "0.5",
                       "--no-draw", *SIZE, "--out", tmp_path)
    assert code == 0, err
    coco = json.loads((tmp_path / "coco_results.json").read_text())
    assert coco and all("image_id" not in r and r["file_name"].endswith(".png") for r in coco)
    assert {r["category_id"] for r in coco} == {DOG}
    records = json.loads((tmp_path / "results.json").read_text())
    assert {d["name"] for r in records for d in r["detections"]} == {"dog"}


def test_eval_warns_about_categories_the_model_does_not_know(tmp_path, caplog):
    model = tiny_model(3, 1)
    save_ddetr(model, model.cfg, tmp_path / "m.pth", ["cat", "dog", "fox"], [3, 7, 11], 64, 100)
    names = write_images(tmp_path / "images", n=1)
    gt = {"images": [{"id": 5, "file_name": names[0], "width": 80, "height": 64}],
          "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 2, 20, 20]}],
          "categories": [{"id": 7, "name": "dog"}, {"id": 99, "name": "zebra"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with caplog.at_level(logging.WARNING):
        code, _, err = run("eval", "--checkpoint", tmp_path / "m.pth", "--images", tmp_path / "images",
                           "--annotations", tmp_path / "gt.json")
    assert code == 0, err
    assert "99 (zebra)" in caplog.text and "no class for 1 of the dataset's 2 categories" in caplog.text


def test_eval_does_not_depend_on_the_order_of_categories(tmp_path):
    model = tiny_model(3, 2)
    save_ddetr(model, model.cfg, tmp_path / "m.pth", ["cat", "dog", "fox"], [3, 7, 11], 64, 100)
    names = write_images(tmp_path / "images")
    detector = Detector.from_checkpoint(tmp_path / "m.pth")
    gt = ground_truth_on_top_boxes(detector, tmp_path / "images", names, [4, 8, 15], 11,
                                   [(1, "person"), (3, "cat"), (7, "dog"), (11, "fox")])
    shuffled = {**gt, "categories": gt["categories"][::-1], "annotations": gt["annotations"][::-1]}
    metrics = []
    for i, data in enumerate((gt, shuffled)):
        (tmp_path / f"gt{i}.json").write_text(json.dumps(data))
        code, _, err = run("eval", "--checkpoint", tmp_path / "m.pth", "--images", tmp_path / "images",
                           "--annotations", tmp_path / f"gt{i}.json", "--out", tmp_path / f"e{i}")
        assert code == 0, err
        metrics.append(json.loads((tmp_path / f"e{i}" / "metrics.json").read_text()))
    assert metrics[0] == metrics[1] and metrics[0]["AP50"] > 0.4


def test_onnx_predict_matches_checkpoint_predict(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_model(3, 1)
    save_ddetr(model, model.cfg, tmp_path / "m.pth", ["cat", "dog", "fox"], [3, 7, 11], 64, 100)
    write_images(tmp_path / "images", n=2, size=(48, 60))  # resized to the checkpoint's 64 px by both paths
    code, _, err = run("export", "--checkpoint", tmp_path / "m.pth", "--out", tmp_path / "m.onnx", "--size", "64",
                       "80")
    assert code == 0, err
    results = {}
    for kind in ("checkpoint", "onnx"):
        source = tmp_path / ("m.pth" if kind == "checkpoint" else "m.onnx")
        code, _, err = run("predict", f"--{kind}", source, tmp_path / "images", "--threshold", "0.2", "--no-draw",
                           "--out", tmp_path / kind)
        assert code == 0, err
        results[kind] = json.loads((tmp_path / kind / "results.json").read_text())
    for a, b in zip(results["checkpoint"], results["onnx"]):
        assert a["detections"] and len(a["detections"]) == len(b["detections"])
        for da, db in zip(a["detections"], b["detections"]):
            assert da["category_id"] == db["category_id"] == 7 and da["name"] == db["name"] == "dog"
            assert max(abs(x - y) for x, y in zip(da["box_xyxy"], db["box_xyxy"])) <= 1.0


def test_convert_keeps_ids_names_and_size_in_every_layout(tmp_path):
    model = tiny_model(3, 1)
    save_ddetr(model, model.cfg, tmp_path / "m.pth", ["cat", "dog", "fox"], [3, 7, 11], 64, 100)
    chain = [("hf", tmp_path / "hf"), ("ddetr", tmp_path / "a.safetensors"), ("official", tmp_path / "o.pth"),
             ("ddetr", tmp_path / "b.pth")]
    source = tmp_path / "m.pth"
    for layout, target in chain:
        code, _, err = run("convert", source, target, "--to", layout)
        assert code == 0, err
        _, _, meta = load_model(target)
        assert (meta["class_names"], meta["category_ids"]) == (["cat", "dog", "fox"], [3, 7, 11]), layout
        assert (meta["val_size"], meta["max_size"]) == (64, 100), layout
        source = target
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"} and hf_config["label2id"]["fox"] == 2
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 64, "longest_edge": 100}


def test_predict_goes_on_past_an_unreadable_image(tmp_path):
    model = tiny_model(3, 1)
    save_ddetr(model, model.cfg, tmp_path / "m.pth", ["cat", "dog", "fox"], [3, 7, 11], 64, 100)
    names = write_images(tmp_path / "images", n=3)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run("predict", "--checkpoint", tmp_path / "m.pth", tmp_path / "images", "--no-draw", "--out",
                       tmp_path / "out")
    assert code == 1
    assert "broken.png" in err and "Traceback" not in err
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(Path(r["file"]).name for r in records) == names
