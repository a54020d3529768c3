"""The `ddetr` CLI end to end on a tiny synthetic dataset, its --help texts, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddetr.cli.main import build_parser
from ddetr.data.synthetic import generate

COMMANDS = ["train", "eval", "predict", "export", "convert", "visualize", "bench", "demo"]
_TINY_SETTINGS = [
    "detector.model.backbone=resnet18", "detector.model.hidden_dim=32", "detector.model.nheads=4",
    "detector.model.enc_layers=1", "detector.model.dec_layers=2", "detector.model.dim_feedforward=64",
    "detector.model.num_queries=10", "detector.model.num_feature_levels=1", "detector.model.frozen_batchnorm=false",
    "data.scales=[64]", "data.max_size=64", "data.crop=false", "data.val_size=64", "data.num_workers=0",
    "optim.lr_drop=10",
]
TINY = [arg for setting in _TINY_SETTINGS for arg in ("--set", setting)]


def ddetr(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddetr", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest not in ("help",) and action.option_strings:
            assert action.help, f"ddetr {command} {action.option_strings} has no help text"
    assert sub.format_help()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    r = ddetr("data", "synth", "--out", str(root / "data"), "--num-train", "6", "--num-val", "3", "--image-size",
              "64", "--min-objects", "1", "--max-objects", "2")
    assert r.returncode == 0, r.stderr
    r = ddetr("train", "--preset", "demo", "--data", str(root / "data" / "train"), "--val-data",
              str(root / "data" / "val"), "--epochs", "1", "--batch-size", "3", "--output", str(root / "run"), *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AP50" in r.stdout
    return root, root / "run" / "last.pth"


def test_eval_predict_convert_export_visualize(trained):
    root, ckpt = trained
    r = ddetr("eval", "--checkpoint", str(ckpt), "--data", str(root / "data" / "val"), "--out", str(root / "eval"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)

    images = root / "data" / "val" / "images"
    r = ddetr("predict", "--checkpoint", str(ckpt), str(images), "--threshold", "0", "--out", str(root / "pred"))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((root / "pred" / "results.json").read_text())
    assert len(results) == 3 and all(rec["detections"] for rec in results)
    assert len(list((root / "pred").glob("*_pred.png"))) == 3
    coco = json.loads((root / "pred" / "coco_results.json").read_text())
    assert coco and {"image_id", "category_id", "bbox", "score"} <= set(coco[0])

    r = ddetr("convert", str(ckpt), str(root / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "hf" / "config.json").is_file()

    r = ddetr("export", "--checkpoint", str(ckpt), "--out", str(root / "m.onnx"), "--size", "64", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    r = ddetr("predict", "--onnx", str(root / "m.onnx"), str(images), "--threshold", "0", "--out",
              str(root / "pred_onnx"), "--size", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    onnx_results = json.loads((root / "pred_onnx" / "results.json").read_text())
    first, second = results[0]["detections"][0], onnx_results[0]["detections"][0]
    assert first["label"] == second["label"] and abs(first["score"] - second["score"]) < 1e-3

    r = ddetr("visualize", "--checkpoint", str(ckpt), str(next(images.iterdir())), "--top", "1", "--out",
              str(root / "viz"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((root / "viz").glob("*.png"))) >= 2


@pytest.mark.parametrize("problem", ["missing", "corrupt_json", "bad_image"])
def test_bad_input_gives_one_line_error(tmp_path, problem):
    generate(tmp_path / "d", num_train=2, num_val=0, image_size=32, min_objects=1, max_objects=1)
    train = tmp_path / "d" / "train"
    if problem == "missing":
        args = ["eval", "--checkpoint", str(tmp_path / "nope.pth"), "--data", str(train)]
    elif problem == "corrupt_json":
        (train / "annotations.json").write_text('{"images": [')
        args = ["train", "--preset", "demo", "--data", str(train), "--epochs", "1", "--output", str(tmp_path / "r")]
    else:
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        args = ["predict", "--checkpoint", str(tmp_path / "nope.pth"), str(bad)]
    r = ddetr(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path) in lines[0]


def test_python_m_ddetr_is_the_same_tool():
    r = ddetr("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_bench_passes_its_options_to_the_benchmark_script():
    r = ddetr("bench", "--quick", "--no-memory", "--batch", "1", "--repeats", "5", "--impls", "reference", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| encoder | 1 |")]
    assert {row.split("|")[3].strip() for row in rows} == {"reference", "hf"}
