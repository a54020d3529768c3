"""The demo-* presets (the paper's switches on the demo model) and `ddetr bench paper-claims` end to end, tiny."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from ddetr.bench import paper_claims
from ddetr.data.synthetic import generate
from ddetr.engine.config import train_preset
from ddetr.engine.trainer import train
from ddetr.interop import load_model
from ddetr.models.config import PRESETS, set_field
from ddetr.models.deform_attn import MSDeformAttn
from ddetr.models.dense_attn import DenseAttention

SWITCHES = {
    "demo-detr": {"num_feature_levels": 1, "with_box_refine": False, "dense_attention": True},
    "demo-single-scale": {"num_feature_levels": 1, "with_box_refine": False},
    "demo-multi-scale": {"with_box_refine": False},
    "demo-two-stage": {"two_stage": True},
}
SHRINK = {"detector.model.hidden_dim": "32", "detector.model.dim_feedforward": "64",
          "detector.model.num_queries": "10", "data.num_workers": "0", "batch_size": "2", "amp": "none"}
# The benchmark runs keep the demo's trained ResNet-18 (about 0.2 s a step here): metrics.jsonl rounds times to
# 0.1 s, and the benchmark trains a budget run again while its logged time is under --budget, so "one epoch (one
# step) spends the budget" needs steps of 0.05 s or more. A much smaller backbone can log 0.0 s.
TINY = ["--image-size", "64", "--num-train", "2", "--num-val", "2", "--budget", "0.01",
        *(arg for key, value in SHRINK.items() for arg in ("--set", f"{key}={value}"))]


def test_demo_presets_differ_from_demo_only_in_the_papers_switches():
    demo = dataclasses.asdict(PRESETS["demo"].model)
    assert demo["num_feature_levels"] == 3 and demo["with_box_refine"] and demo["pretrained_backbone"] == "none"
    for name, switches in SWITCHES.items():
        model = dataclasses.asdict(PRESETS[name].model)
        assert {k: v for k, v in model.items() if v != demo[k]} == switches, name


@pytest.mark.parametrize("name", ["demo", *SWITCHES])
def test_every_demo_preset_gets_the_demo_recipe(name):
    cfg, demo = train_preset(name), train_preset("demo")
    assert cfg.output_dir == f"runs/{name}"
    assert cfg.detector == PRESETS[name]
    cfg.output_dir, cfg.detector = demo.output_dir, demo.detector
    assert cfg == demo
    assert demo.time_budget and demo.batch_size == 8 and demo.detector.model.pretrained_backbone == "none"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(root, num_train=2, num_val=2, image_size=64, seed=0)
    return root


@pytest.mark.parametrize("name", ["demo", *SWITCHES])
def test_every_demo_preset_builds_and_trains(name, tiny_data, tmp_path):
    cfg = train_preset(name)
    # a frozen backbone: no Adam moments for it, a third of the checkpoint to write
    for key, value in {**SHRINK, "detector.model.train_backbone": "false", "data.scales": "[64]",
                       "data.max_size": "64", "data.crop": "false", "data.val_size": "64", "epochs": "1",
                       "time_budget": "null"}.items():
        set_field(cfg, key, value)
    cfg.data.train, cfg.output_dir = str(tiny_data / "train"), str(tmp_path)
    train(cfg)
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1] and math.isfinite(entries[0]["loss"])
    model, loaded, _ = load_model(tmp_path / "last.pth")
    m = PRESETS[name].model
    assert (loaded.model.num_feature_levels, loaded.model.two_stage) == (m.num_feature_levels, m.two_stage)
    kinds = {type(module) for module in model.modules()}
    assert (DenseAttention in kinds, MSDeformAttn in kinds) == (m.dense_attention, not m.dense_attention)
    assert len(model.input_proj) == m.num_feature_levels
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert ("enc_outputs" in out) == m.two_stage


def test_paper_claims_quick_path_end_to_end(tmp_path):
    out = tmp_path / "bench"
    assert paper_claims.main(["--quick", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["presets"]) == list(paper_claims.ORDER)
    epochs = results["equal_epochs"]
    assert epochs == results["presets"]["demo"]["budget"][-1]["epoch"]  # as many as demo started in the budget
    for name, r in results["presets"].items():
        assert r["dense"] == (name == "demo-detr") and r["params"] > 1e6 and r["inference_ms"] > 0
        assert r["budget"][-1]["time"] >= 0.01  # trained until the budget was spent
        assert [c["epoch"] for c in r["epochs"]] == list(range(1, epochs + 1))
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "loss", "time"} <= set(r["epochs"][-1])
    table = (out / "table.md").read_text()
    assert "| Method | preset | epochs | training s | AP | AP50 | AP75 | APs | APm | APl |" in table
    assert all(f"`{name}`" in table for name in paper_claims.ORDER) and "Equal epochs" in table
    assert (out / "paper_claims.png").read_bytes()[:4] == b"\x89PNG"
    assert list(out.glob("*_detections.png")) and list(out.glob("*_encoder_*.png")) and list(out.glob("*_det1_*.png"))


def test_paper_claims_resumes_and_skips_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--presets", "demo-detr", "demo", "--epochs", "2", *TINY]
    calls: list[tuple[str, int, str | None]] = []

    def interrupted_at(n: int | None):
        def fake_train(cfg, resume=None):
            if len(calls) + 1 == n:
                raise KeyboardInterrupt
            calls.append((str(Path(cfg.output_dir).relative_to(out / "runs")), cfg.epochs, resume))
            return train(cfg, resume=resume)
        return fake_train

    # budget runs (one call each), then equal epochs: demo-detr epoch 1, interrupted before its epoch 2
    monkeypatch.setattr(paper_claims, "train", interrupted_at(4))
    with pytest.raises(KeyboardInterrupt):
        paper_claims.main(argv)
    assert [c[:2] for c in calls] == [("budget/demo-detr", 1), ("budget/demo", 1), ("epochs-2/demo-detr", 1)]
    calls.clear()
    monkeypatch.setattr(paper_claims, "train", interrupted_at(None))
    paper_claims.main(argv)
    runs = out / "runs" / "epochs-2"
    assert calls == [("epochs-2/demo-detr", 2, str(runs / "demo-detr" / "last.pth")), ("epochs-2/demo", 1, None),
                     ("epochs-2/demo", 2, str(runs / "demo" / "last.pth"))]
    curve = json.loads((out / "results.json").read_text())["presets"]["demo-detr"]["epochs"]
    assert [c["epoch"] for c in curve] == [1, 2]

    calls.clear()
    monkeypatch.setattr(paper_claims, "evaluate_checkpoint", lambda *a: pytest.fail("finished runs re-evaluated"))
    paper_claims.main(argv)
    assert calls == []
    with pytest.raises(ValueError, match="other settings"):
        paper_claims.main([*argv, "--seed", "1"])
