"""Training engine: loss goes down, exact resume after SIGKILL, DDP == single process, checkpoints load safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddetr.data.synthetic import generate
from ddetr.engine.config import DataConfig, TrainConfig
from ddetr.engine.data import make_loader
from ddetr.engine.optim import OptimConfig
from ddetr.engine.trainer import Trainer
from ddetr.models.config import DetectorConfig, ModelConfig, save_config

TINY_MODEL = ModelConfig(num_classes=6, backbone="resnet18", frozen_batchnorm=True, num_feature_levels=2,
                         hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0,
                         num_queries=10, enc_n_points=2, dec_n_points=2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=8, num_val=4, image_size=64, seed=1, min_objects=1, max_objects=3)
    return root


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    cfg = TrainConfig(
        detector=DetectorConfig(model=ModelConfig(**vars(TINY_MODEL))),
        data=DataConfig(train=str(data / "train"), val=str(data / "val"), scales=(64,), max_size=64, crop=False,
                        val_size=64, num_workers=0),
        optim=OptimConfig(lr=1e-3, lr_backbone=1e-3, lr_drop=100),
        epochs=3, batch_size=2, seed=3, output_dir=str(out), device="cpu")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddetr", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_training_steps_reduce_loss(tiny_data, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_data, tmp_path, epochs=1)
    trainer = Trainer(cfg)
    images, masks, targets = next(iter(make_loader(trainer.train_set, 4, False, 0, 0)))
    losses = []
    for _ in range(30):
        out = trainer.model(images, masks)
        loss = trainer.criterion(out, targets)["loss"]
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(float(loss.detach()))
    assert max(losses[-5:]) < 0.75 * losses[0], losses  # falls clearly, whatever the thread count


def test_checkpoint_is_atomic_and_loads_without_pickle(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=1)
    Trainer(cfg).fit()
    ckpt = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "ddetr" and ckpt["epoch"] == 1
    assert ckpt["class_names"] and len(ckpt["category_ids"]) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".last.pth")]  # no temp files left behind
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    ref_cfg = tiny_config(tiny_data, tmp_path / "ref")
    save_config(ref_cfg, tmp_path / "ref.yaml")
    done = run_cli("train", "--config", str(tmp_path / "ref.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]

    cfg = tiny_config(tiny_data, tmp_path / "killed", checkpoint_every=1)
    save_config(cfg, tmp_path / "killed.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ddetr", "train", "--config", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = tmp_path / "killed" / "last.pth"
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                state = torch.load(last, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - the file is being replaced; try again
                continue
            if state["global_step"] >= 6 and state["step_in_epoch"] > 0:  # mid-way through epoch 2
                proc.send_signal(signal.SIGKILL)
                killed_at = (state["epoch"], state["step_in_epoch"])
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed mid-epoch"
    resumed = run_cli("train", "--config", str(tmp_path / "killed.yaml"), "--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "ref" / "last.pth"), final_weights(last)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_torchrun_two_ranks_equal_single_process(tiny_data, tmp_path):
    single = tiny_config(tiny_data, tmp_path / "single", epochs=1, batch_size=4)
    save_config(single, tmp_path / "single.yaml")
    r = run_cli("train", "--config", str(tmp_path / "single.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = tiny_config(tiny_data, tmp_path / "ddp", epochs=1, batch_size=2)
    save_config(ddp, tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", "-m", "ddetr", "train", "--config", str(tmp_path / "ddp.yaml")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sums = [line.split()[-1] for line in r.stderr.splitlines() if "weights checksum" in line]
    assert len(sums) == 2 and sums[0] == sums[1], r.stderr[-3000:]  # both ranks end with identical weights
    a, b = final_weights(tmp_path / "single" / "last.pth"), final_weights(tmp_path / "ddp" / "last.pth")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP differs from single")


def test_resume_refuses_other_model(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=1)
    Trainer(cfg).fit()
    other = tiny_config(tiny_data, tmp_path / "other", epochs=2)
    other.detector.model.num_queries = 12
    with pytest.raises(ValueError, match="different model config"):
        Trainer(other).fit(resume=str(tmp_path / "last.pth"))


class FakeClock:
    """time.monotonic stand-in that advances one second per call: budgets become step counts, not machine speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_time_budget_drops_lr_then_stops_mid_epoch(tiny_data, tmp_path, monkeypatch):
    import ddetr.engine.trainer as trainer_module

    cfg = tiny_config(tiny_data, tmp_path, epochs=50, time_budget=7.0, lr_drop_fraction=0.3)
    trainer = Trainer(cfg)
    base = [g["lr"] for g in trainer.optimizer.param_groups]
    monkeypatch.setattr(trainer_module.time, "monotonic", FakeClock())
    metrics = trainer.fit()
    steps_per_epoch = 4  # 8 images, batch 2
    # the budget is checked every step: training stopped inside the first epoch, not at an epoch boundary
    assert trainer.epoch == 1 and 0 < trainer.global_step < steps_per_epoch
    assert trainer.lr_dropped_by_time
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr * 0.1 for lr in base])
    assert "AP50" in metrics  # evaluated after stopping


def test_resuming_a_finished_run_only_evaluates(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=1)
    Trainer(cfg).fit()
    before = final_weights(tmp_path / "last.pth")
    again = Trainer(tiny_config(tiny_data, tmp_path, epochs=1))
    metrics = again.fit(resume=str(tmp_path / "last.pth"))
    assert "AP" in metrics and again.global_step == 4
    for key, value in final_weights(tmp_path / "last.pth").items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_amp_auto_is_bf16_only_where_native(monkeypatch):
    from ddetr.engine import trainer

    cpu = torch.device("cpu")
    assert trainer.resolve_amp("fp16", cpu) == "fp16" and trainer.resolve_amp("none", cpu) == "none"
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "none")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert trainer.resolve_amp("auto", cpu) == expected
    with pytest.raises(ValueError, match="auto"):
        TrainConfig(amp="bf32")
