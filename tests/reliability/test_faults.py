"""Faults injected into training: a checkpoint write that fails (file-size limit, read-only folder), a loss that
diverges, SIGKILL during the evaluation and during a checkpoint write. Each stops with one line and keeps the last
checkpoint; a killed run resumed with `--resume` alone ends identical to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import WALL_CLOCK, fresh_log_handler, single_thread

from ddetr.cli.main import main
from ddetr.engine import trainer as trainer_module

from .conftest import ddetr_subprocess, fingerprint, stderr_lines, train_args

CHECKPOINTS = ("last.pth", "best.pth", "metrics.jsonl")


def saved(run: Path) -> dict[str, str]:
    """Fingerprints of what a run has saved: its checkpoints and its log."""
    return {Path(k).name: v for k, v in fingerprint(run).items() if Path(k).name in CHECKPOINTS}


def one_error(err: str, command: str = "train") -> str:
    lines = stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"ddetr {command}: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the session's one-epoch run, to be resumed (and damaged) by one test."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_checkpoint_write_past_the_file_size_limit(run_copy):
    before = saved(run_copy)
    result = ddetr_subprocess("train", "--resume", run_copy / "last.pth", "--epochs", "2", limit_file_size=4 << 20)
    assert result.returncode == 2, result.stderr[-3000:]  # SIGXFSZ ignored: the write failed, the process did not die
    line = one_error(result.stderr)
    assert str(run_copy / "last.pth") in line and "File too large" in line and "previous one is unchanged" in line
    assert saved(run_copy) == before
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]  # the temporary file is gone


def test_run_in_a_read_only_folder(run_copy):
    before = saved(run_copy)
    for path in [run_copy, *run_copy.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        result = ddetr_subprocess("train", "--resume", run_copy / "last.pth", "--epochs", "2",
                                  without_dac_override=True)
    finally:
        for path in [run_copy, *run_copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error(result.stderr)
    assert str(run_copy) in line and "Permission denied" in line
    assert saved(run_copy) == before


def test_checkpoint_write_into_a_read_only_folder_keeps_the_previous(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    torch.save({"w": torch.zeros(3)}, folder / "last.pth")
    before = fingerprint(folder)
    folder.chmod(0o555)
    script = ("from ddetr.engine.checkpoint import save_atomic\nimport torch, sys\n"
              f"try:\n    save_atomic({{'w': torch.ones(3)}}, {str(folder / 'last.pth')!r})\n"
              "except OSError as e:\n    print(e, file=sys.stderr)\n    sys.exit(2)\n")
    try:
        result = ddetr_subprocess(without_dac_override=True, python=["-c", script])
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    assert stderr_lines(result.stderr) == [f"{folder / 'last.pth'}: could not write the checkpoint (the previous one "
                                           "is unchanged): Permission denied"]
    assert fingerprint(folder) == before


def test_diverging_loss_stops_with_one_line_and_saves_no_non_finite_weights(dataset, tmp_path, run_cli, monkeypatch):
    build = trainer_module.build
    training_calls = []

    def nan_from_third_training_step(module, inputs, outputs):
        """From the third training forward on, the predictions are NaN (as after the weights blew up)."""
        if module.training:
            training_calls.append(1)
            if len(training_calls) >= 3:
                return {**outputs, "pred_logits": outputs["pred_logits"] * float("nan")}
        return outputs

    def diverging_build(cfg, **kw):
        model, criterion, postprocess = build(cfg, **kw)
        model.register_forward_hook(nan_from_third_training_step)
        return model, criterion, postprocess

    monkeypatch.setattr(trainer_module, "build", diverging_build)
    run = tmp_path / "run"
    result = run_cli(*train_args(dataset, run, "--epochs", "3", "--set", "checkpoint_every=1"))
    assert result.code == 2, result.err[-3000:]
    line = one_error(result.err)
    assert "not finite at epoch 2 step 1" in line and str(run / "last.pth") in line
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["train_state"]["global_step"] == 2  # the checkpoint of the step before
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1, written once


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run, here with one thread like the killed child processes (the same arithmetic,
    bit for bit: the resumed runs below are compared with it exactly)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    fresh_log_handler()
    with single_thread():
        assert main(train_args(dataset, run, "--epochs", "2")) == 0
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def log_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# Checkpoint writes of the 2-epoch run: 1 last (before epoch 1's evaluation), 2 best, 3 last, 4 last (before epoch 2's
# evaluation), ... `checkpoint-write:4` dies with epoch 2 trained but not saved: its training is redone.
@pytest.mark.parametrize("kill_at", ["evaluate:2", "checkpoint-write:4"])
def test_sigkill_then_resume_alone_ends_as_the_uninterrupted_run(kill_at, reference, dataset, tmp_path, run_cli):
    run = tmp_path / "run"
    killed = ddetr_subprocess(*train_args(dataset, run, "--epochs", "2"), env={"DDETR_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(log_lines(run)) == 1  # epoch 2 was never logged
    if kill_at.startswith("checkpoint-write"):
        assert [p for p in run.iterdir() if p.name.startswith(".last.pth.")]  # the interrupted write's temp file
    with single_thread():  # as in the child processes: the same arithmetic, bit for bit
        result = run_cli("train", "--resume", run / "last.pth")
    assert result.code == 0, result.err[-3000:]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    for name in ("last.pth", "best.pth"):
        expected, got = weights(reference / name), weights(run / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    assert log_lines(run) == log_lines(reference)  # each epoch once, epoch 2's evaluation redone
