"""Training engine: loss goes down, exact resume after a crash or SIGKILL, DDP == single process, checkpoints load
safely, the run state in one definition, the time budget, non-finite losses and the run-folder rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import WALL_CLOCK, ddetr_subprocess, single_thread

from ddetr.data.synthetic import generate
from ddetr.engine import trainer as trainer_module
from ddetr.engine.config import DataConfig, OptimConfig, TrainConfig
from ddetr.engine.data import make_loader
from ddetr.engine.device import resolve_amp
from ddetr.engine.state import TrainState
from ddetr.engine.trainer import Trainer
from ddetr.models.config import DetectorConfig, ModelConfig, save_config

# timm's 0.4M-parameter test ResNet: the engine does not care which backbone it trains, and its 4 MB checkpoints
# (ResNet-18's are 130 MB) keep the many saves, fsyncs and loads here cheap.
TINY_MODEL = ModelConfig(num_classes=6, backbone="timm:test_resnet", pretrained_backbone=None, frozen_batchnorm=True,
                         num_feature_levels=2, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                         dim_feedforward=64, dropout=0.0, num_queries=10, enc_n_points=2, dec_n_points=2)


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


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run (one thread: comparable bit for bit with the child processes)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with single_thread():
        Trainer(tiny_config(tiny_data, out, epochs=2)).fit()
    return out


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    """A finished one-epoch run (last.pth, best.pth, metrics.jsonl, ...); tests use copies (`finished_copy`)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_config(tiny_data, out, epochs=1)).fit()
    return out


def finished_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def history(folder: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times (the rest must repeat exactly)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=f"{key} differs")


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


def test_checkpoints_atomic_safe_and_best_is_weights_only(tiny_data, tmp_path):
    from ddetr.inference import Detector

    cfg = tiny_config(tiny_data, tmp_path, epochs=1)
    cfg.detector.model.backbone = "resnet18"  # big weights: the file sizes are those of the tensors
    cfg.detector.model.frozen_batchnorm = False  # every weight trained: last.pth holds 2 Adam moments of each
    Trainer(cfg).fit()
    last = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    assert last["format"] == "ddetr" and last["train_state"]["epoch"] == 1
    assert last["class_names"] and len(last["category_ids"]) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "curves.png").stat().st_size > 1000
    best = torch.load(tmp_path / "best.pth", map_location="cpu", weights_only=True)
    assert set(best) == {"format", "version", "config", "train_config", "model", "class_names", "category_ids",
                         "val_size", "max_size"}  # no optimiser, scheduler, RNG or progress
    ratio = (tmp_path / "best.pth").stat().st_size / (tmp_path / "last.pth").stat().st_size
    assert ratio < 0.3345, ratio  # a third, less the Adam moments of the BatchNorm statistics (buffers)
    detector = Detector.from_checkpoint(tmp_path / "best.pth")
    assert detector.class_names == last["class_names"] and detector.size == 64


def test_state_is_saved_and_restored_from_one_definition(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, epochs=5))
    fields = [f.name for f in dataclasses.fields(TrainState)]
    assert set(trainer.checkpoint()["train_state"]) == set(fields)
    odd = TrainState(epoch=2, step_in_epoch=1, global_step=9, best_ap=0.25, elapsed=12.5, lr_dropped_by_time=True,
                     epoch_trained=False, loss_sums={"loss": 3.0}, loss_count=2, history=[{"epoch": 1, "loss": None}])
    trainer.state = odd
    trainer.save("last")
    again = Trainer(tiny_config(tiny_data, tmp_path, epochs=5), resume=tmp_path / "last.pth")
    assert again.state == odd
    legacy = {"epoch": 2, "step_in_epoch": 1, "global_step": 9, "best_ap": 0.25, "elapsed": 12.5,
              "history": json.dumps([{"epoch": 1}]), "lr_dropped_by_time": True}  # version-1 layout
    assert TrainState.from_checkpoint(legacy).history == [{"epoch": 1}]


@pytest.mark.usefixtures("one_thread")
def test_crash_mid_step_then_resume_is_exact_and_logs_whole_epochs(tiny_data, reference, tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    steps = []

    def crash_at_sixth_step(name: str) -> None:
        steps.append(name)
        if name == "step" and steps.count("step") == 6:  # mid-way through epoch 2
            raise Crash

    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=2, checkpoint_every=1)
    monkeypatch.setattr(trainer_module, "kill_point", crash_at_sixth_step)
    with pytest.raises(Crash):
        Trainer(cfg).fit()
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["train_state"]["step_in_epoch"] == 1
    resumed = Trainer(cfg, resume=tmp_path / "run" / "last.pth")
    resumed.fit()
    assert_same_weights(final_weights(reference / "last.pth"), final_weights(tmp_path / "run" / "last.pth"))
    assert history(tmp_path / "run") == history(reference)  # epoch 2's loss covers all its steps, once


@pytest.mark.usefixtures("one_thread")
def test_sigkill_then_resume_alone_matches_uninterrupted_run(tiny_data, reference, tmp_path, run_cli):
    cfg = tiny_config(tiny_data, tmp_path / "killed", epochs=2, checkpoint_every=1)
    save_config(cfg, tmp_path / "killed.yaml")
    # SIGKILL (the process's own, from the fault-injection point) in step 7, mid-way through epoch 2: the last
    # checkpoint is step 6's
    killed = ddetr_subprocess("train", "--config", tmp_path / "killed.yaml", env={"DDETR_KILL_AT": "step:7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "killed" / "last.pth"
    state = torch.load(last, map_location="cpu", weights_only=True)["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)
    resumed = run_cli("train", "--resume", last)  # alone: the saved config decides everything
    assert resumed.code == 0, resumed.err[-2000:]
    assert_same_weights(final_weights(reference / "last.pth"), final_weights(last), atol=1e-6)
    assert [h["epoch"] for h in history(tmp_path / "killed")] == [1, 2]


@pytest.mark.usefixtures("one_thread")
def test_torchrun_two_ranks_equal_single_process(tiny_data, tmp_path):
    # ResNet-18: the GroupNorm after each input projection cancels its conv bias, whose gradient is then rounding
    # noise that Adam scales up to full steps unless the features are large, as ResNet-18's are
    single = tiny_config(tiny_data, tmp_path / "single", epochs=1, batch_size=4)
    ddp = tiny_config(tiny_data, tmp_path / "ddp", epochs=1, batch_size=2)
    single.detector.model.backbone = ddp.detector.model.backbone = "resnet18"
    Trainer(single).fit()  # here, with one thread as each rank
    save_config(ddp, tmp_path / "ddp.yaml")
    r = ddetr_subprocess(python=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
                                 "-m", "ddetr", "train", "--config", str(tmp_path / "ddp.yaml")])
    assert r.returncode == 0, r.stderr[-3000:]
    sums = [line.split()[-1] for line in r.stderr.splitlines() if "weights checksum" in line]
    assert len(sums) == 2 and sums[0] == sums[1], r.stderr[-3000:]  # both ranks end with identical weights
    a, b = final_weights(tmp_path / "single" / "last.pth"), final_weights(tmp_path / "ddp" / "last.pth")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP differs from single")
    losses = [h["loss"] for h in (history(tmp_path / "single")[0], history(tmp_path / "ddp")[0])]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the logged loss is the mean over ranks


def test_resume_refuses_other_config_by_name(tiny_data, finished, tmp_path):
    run = finished_copy(finished, tmp_path)
    other = tiny_config(tiny_data, run, epochs=2)
    other.detector.model.num_queries = 12
    other.optim.lr = 5e-4
    with pytest.raises(ValueError, match=r"detector\.model\.num_queries: saved 10, given 12; optim\.lr: saved"):
        Trainer(other, resume=run / "last.pth")
    with pytest.raises(ValueError, match="weights only"):
        Trainer(tiny_config(tiny_data, run, epochs=2), resume=run / "best.pth")


def test_run_folder_is_never_overwritten_silently(tiny_data, finished, tmp_path):
    run = finished_copy(finished, tmp_path)
    before = (run / "last.pth").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny_config(tiny_data, run, epochs=1))
    assert (run / "last.pth").read_bytes() == before
    (run / "notes.txt").write_text("mine")
    trainer = Trainer(tiny_config(tiny_data, run, epochs=1, eval_every=5), overwrite=True)
    trainer.val_set = None  # no evaluation: no best.pth in the new run
    trainer.fit()
    assert not (run / "best.pth").exists() and (run / "notes.txt").read_text() == "mine"
    assert len(history(run)) == 1  # the old run's log line is gone, not appended to


def test_non_finite_loss_stops_with_one_line_and_saves_nothing(tiny_data, tmp_path):
    class NanOnThirdCall(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, outputs, targets):
            losses = self.inner(outputs, targets)
            self.calls += 1
            return {**losses, "loss": losses["loss"] * float("nan")} if self.calls == 3 else losses

    trainer = Trainer(tiny_config(tiny_data, tmp_path, epochs=2, checkpoint_every=1))
    trainer.criterion = NanOnThirdCall(trainer.criterion)
    with pytest.raises(FloatingPointError, match="epoch 1 step 3") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["train_state"]["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_time_budget_drops_lr_then_stops_mid_epoch(tiny_data, tmp_path, monkeypatch):
    import ddetr.engine.state as state_module

    class FakeClock:
        """time.monotonic stand-in advancing one second per call: budgets become call counts, not machine speed."""

        def __init__(self) -> None:
            self.now = 0.0

        def __call__(self) -> float:
            self.now += 1.0
            return self.now

    cfg = tiny_config(tiny_data, tmp_path, epochs=50, time_budget=3.0, lr_drop_fraction=0.5)
    trainer = Trainer(cfg)
    base = [g["lr"] for g in trainer.optimizer.param_groups]
    monkeypatch.setattr(state_module.time, "monotonic", FakeClock())
    metrics = trainer.fit()
    steps_per_epoch = 4  # 8 images, batch 2
    # the budget is checked every step: training stopped inside the first epoch, not at an epoch boundary
    assert trainer.state.epoch == 1 and 0 < trainer.state.global_step < steps_per_epoch
    assert trainer.state.lr_dropped_by_time
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr * 0.1 for lr in base])
    assert "AP50" in metrics  # evaluated after stopping


def test_resuming_a_finished_run_only_evaluates(tiny_data, finished, tmp_path):
    run = finished_copy(finished, tmp_path)
    before = (run / "last.pth").read_bytes()
    again = Trainer(tiny_config(tiny_data, run, epochs=1), resume=run / "last.pth")
    metrics = again.fit()
    assert "AP" in metrics and again.state.global_step == 4
    assert (run / "last.pth").read_bytes() == before


def test_amp_auto_is_bf16_only_where_native_and_fp16_needs_a_gpu(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) == "none" and resolve_amp("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 on cpu"):
        resolve_amp("fp16", cpu)
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "none")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_amp("auto", cpu) == expected
    with pytest.raises(ValueError, match="auto"):
        TrainConfig(amp="bf32")


def test_bf16_asked_for_on_a_cpu_without_it_runs_with_a_warning(monkeypatch, caplog):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=native: v)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ddetr.engine.device"):
            assert resolve_amp("bf16", cpu) == "bf16"
        warned = [r.getMessage() for r in caplog.records]
        assert warned == ([] if native else [warned[0]]) and (native or "emulates" in warned[0])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be >= 1"), ("time_budget", -5.0, "time_budget"), ("device", "tpu", "device"),
    ("lr_drop_fraction", 1.5, "lr_drop_fraction"), ("checkpoint_every", -1, "checkpoint_every")])
def test_train_config_checks_its_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="lr must be"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match="crop_size"):
        DataConfig(crop_size=(600, 384))


def test_metrics_report_training_speed_and_data_wait(finished):
    """Each epoch logs its training steps/s and the share of that time spent waiting for the loader."""
    entry = json.loads((finished / "metrics.jsonl").read_text().splitlines()[-1])
    assert entry["steps_per_s"] > 0 and 0.0 <= entry["data_wait"] <= 1.0


def test_training_runs_channels_last_and_saves_row_major(tiny_data, tmp_path):
    """A torchvision ResNet trains in channels_last (oneDNN's layout); checkpoints hold plain row-major copies."""
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    cfg.detector.model.backbone = "resnet18"
    trainer = Trainer(cfg)
    conv = trainer.model.backbone.body.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    trainer.save("last")
    saved = final_weights(tmp_path / "run" / "last.pth")
    assert all(t.is_contiguous() for t in saved.values())
    assert torch.equal(saved["backbone.body.layer2.0.conv1.weight"], conv)
