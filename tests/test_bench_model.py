"""`ddetr bench model` end to end on tiny images: every table printed, ours and HF agreeing on the same weights, the
inference-ready model agreeing with the model as built, and no ImageNet download (random weights suffice to time)."""

from __future__ import annotations

import re

import pytest

from ddetr.bench import model as bench_model


def test_bench_model_prints_every_table_with_parity(capsys, monkeypatch, tmp_path, one_thread):
    """bf16 inference forced on (``--bf16 yes``): on a CPU without bf16 instructions it is emulated, slow but
    correct; the training table with its fp32 row (a bf16 row is the same cells: the emulated HF step alone would
    take ~45 s on an AVX2 CPU)."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: any weight download would fail offline
    assert bench_model.main(["--presets", "deformable-detr-two-stage", "--batch", "1", "--size", "128", "160",
                             "--repeats", "1", "--threads", "1", "--bf16", "yes", "--train", "fp32"]) == 0
    out = capsys.readouterr().out
    for title in ("### fp32 inference", "### bf16 autocast inference", "### one training step", "### where the"):
        assert title in out
    row = next(line for line in out.splitlines() if line.startswith("| deformable-detr-two-stage | 1 |"))
    diffs = [float(x) for x in re.findall(r"\d\.\de[-+]\d\d", row)]
    assert len(diffs) == 4 and max(diffs) < 1e-3, row  # ours vs HF, ready vs ours: logits and boxes
    split = [line for line in out.splitlines() if "| ours |" in line or "| ready |" in line or "| hf |" in line]
    assert len(split) == 3
    train = [line for line in out.splitlines() if line.startswith("| deformable-detr-two-stage | 1 | fp32 |")]
    assert len(train) == 1 and re.search(r"\| \d+\.\d\dx \|", train[0]), train
    bf16 = out[out.index("### bf16 autocast inference"):out.index("### one training step")]
    assert len(re.findall(r" \d+\.\d\dx ", bf16)) == 2, bf16  # HF/ready and HF fp32 / ready


def test_bench_model_inference_only(capsys, one_thread):
    """--train none: batch sizes whose HF training step does not fit in memory can still be timed."""
    pytest.importorskip("transformers")
    assert bench_model.main(["--presets", "deformable-detr", "--batch", "2", "--size", "96", "128",
                             "--repeats", "1", "--threads", "1", "--train", "none"]) == 0
    out = capsys.readouterr().out
    assert "### fp32 inference" in out and "### one training step" not in out


def test_bench_model_times_bf16_only_where_the_cpu_computes_it(capsys, monkeypatch, one_thread):
    """--bf16 auto: emulated bf16 would time PyTorch's emulation (7x slower than fp32 on an AVX2 CPU), not the
    model, so it is left out there, saying so, from inference and training alike."""
    pytest.importorskip("transformers")
    timed = []
    real = bench_model.bench_preset

    class Recorded(Exception):
        pass

    def record(*args):
        timed.append(args[5:])
        if args[6]:  # bf16 would be timed: its tables are test_bench_model_prints_every_table_with_parity's
            raise Recorded
        return real(*args)

    monkeypatch.setattr(bench_model, "bench_preset", record)
    argv = ["--presets", "deformable-detr-single-scale", "--batch", "1", "--size", "64", "96", "--repeats", "1",
            "--threads", "1", "--train", "fp32", "bf16"]
    monkeypatch.setattr(bench_model, "native_bf16", lambda device: True)
    with pytest.raises(Recorded):
        bench_model.main(argv)
    assert timed == [(("fp32", "bf16"), True)] and "not timed" not in capsys.readouterr().out
    timed.clear()
    monkeypatch.setattr(bench_model, "native_bf16", lambda device: False)
    assert bench_model.main(argv) == 0
    out = capsys.readouterr().out
    assert timed == [(("fp32",), False)]
    assert "bf16 not timed: this CPU has no bf16 instructions" in out
    assert "### bf16 autocast inference" not in out and "| bf16 |" not in out
    assert "### one training step" in out and "| fp32 |" in out


def test_bench_model_keeps_freed_memory_only_when_asked(capsys, monkeypatch, one_thread):
    """--keep-freed-memory: the allocator `ddetr train` and `eval` use on CPU, for both implementations (it is
    process-wide), said in the header; by default glibc's, as a user's own script has it."""
    calls = []

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(bench_model, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(bench_model, "bench_preset", stop)
    argv = ["--presets", "deformable-detr", "--batch", "1", "--threads", "1", "--train", "none"]
    with pytest.raises(Stop):
        bench_model.main(argv)
    assert calls == [] and "default allocator" in capsys.readouterr().out
    with pytest.raises(Stop):
        bench_model.main([*argv, "--keep-freed-memory"])
    assert calls == [True] and "freed memory kept in the heap" in capsys.readouterr().out
