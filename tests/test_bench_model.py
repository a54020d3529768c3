"""`ddetr bench model` end to end on tiny images: every table printed, ours and HF agreeing on the same weights, the
inference-ready model agreeing with the model as built, and no ImageNet download (random weights suffice to time)."""

from __future__ import annotations

import re

import pytest

from ddetr.bench import model as bench_model


def test_bench_model_prints_every_table_with_parity(capsys, monkeypatch, tmp_path, one_thread):
    pytest.importorskip("transformers")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: any weight download would fail offline
    assert bench_model.main(["--presets", "deformable-detr-two-stage", "--batch", "1", "--size", "160", "224",
                             "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for title in ("### fp32 inference", "### bf16 autocast inference", "### one training step", "### where the"):
        assert title in out
    row = next(line for line in out.splitlines() if line.startswith("| deformable-detr-two-stage | 1 |"))
    diffs = [float(x) for x in re.findall(r"\d\.\de[-+]\d\d", row)]
    assert len(diffs) == 4 and max(diffs) < 1e-3, row  # ours vs HF, ready vs ours: logits and boxes
    split = [line for line in out.splitlines() if "| ours |" in line or "| ready |" in line or "| hf |" in line]
    assert len(split) == 3
    train = [line for line in out.splitlines() if line.startswith("| deformable-detr-two-stage | 1 | fp32 |")
             or line.startswith("| deformable-detr-two-stage | 1 | bf16 |")]
    assert len(train) == 2 and all(re.search(r"\| \d+\.\d\dx \|", line) for line in train), train


def test_bench_model_inference_only(capsys, one_thread):
    """--train none: batch sizes whose HF training step does not fit in memory can still be timed."""
    pytest.importorskip("transformers")
    assert bench_model.main(["--presets", "deformable-detr", "--batch", "2", "--size", "96", "128",
                             "--repeats", "1", "--threads", "1", "--train", "none"]) == 0
    out = capsys.readouterr().out
    assert "### fp32 inference" in out and "### one training step" not in out
