"""The training loop: the paper's recipe, AMP, accumulation, DDP, atomic resumable checkpoints, logs and curves."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddetr.engine import checkpoint as ckpt_io
from ddetr.engine import distributed as dist
from ddetr.engine.config import TrainConfig
from ddetr.engine.data import SeededDataset, build_datasets, make_loader
from ddetr.engine.evaluate import evaluate
from ddetr.engine.optim import build_optimizer, build_scheduler
from ddetr.models import build
from ddetr.models.config import save_config

log = logging.getLogger("ddetr.train")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: CUDA with bf16 support, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` becomes bf16 where it is native (faster there) and none elsewhere (emulated bf16 is slower)."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns one run: ``Trainer(cfg).fit(resume=..., pretrained=...)`` trains, evaluates and checkpoints."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        dist.init_from_env(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_all(cfg.seed + dist.rank())
        self.out = Path(cfg.output_dir)
        self.train_set, self.val_set = build_datasets(cfg.data)
        if self.train_set is None:
            raise ValueError("training needs a train dataset (--data DIR)")
        if cfg.detector.model.num_classes != self.train_set.num_classes:
            log.info("num_classes set to %d from %s", self.train_set.num_classes, self.train_set.annotations_json)
            cfg.detector.model.num_classes = self.train_set.num_classes
        self.model, self.criterion, self.postprocess = build(cfg.detector)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.lr_drop)
        amp = resolve_amp(cfg.amp, self.device)
        if amp != cfg.amp:
            log.info("amp auto: %s on %s", amp, self.device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_ap, self.elapsed, self.history = -1.0, 0.0, []
        self.lr_dropped_by_time = False

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": self.cfg.detector.to_dict(),
            "train_config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "class_names": self.train_set.class_names, "category_ids": self.train_set.category_ids,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_ap": self.best_ap, "elapsed": self.elapsed,
            "history": json.dumps(self.history), "lr_dropped_by_time": self.lr_dropped_by_time,
            "rng": ckpt_io.rng_state(),
        }

    def save(self, name: str) -> None:
        if dist.is_main():
            ckpt_io.save_atomic(self.state(), self.out / f"{name}.pth")

    def resume(self, path: str | Path) -> None:
        ck = ckpt_io.load(path)
        if ck.get("format") != ckpt_io.FORMAT or "optimizer" not in ck:
            raise ValueError(f"{path}: not a ddetr training checkpoint (use --pretrained to start from weights)")
        if ck["config"]["model"] != self.cfg.detector.to_dict()["model"]:
            raise ValueError(f"{path}: checkpoint was trained with a different model config; resume with its config")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step_in_epoch = int(ck["epoch"]), int(ck["step_in_epoch"])
        self.global_step, self.best_ap = int(ck["global_step"]), float(ck["best_ap"])
        self.elapsed = float(ck["elapsed"])
        self.history = json.loads(ck["history"])
        self.lr_dropped_by_time = bool(ck["lr_dropped_by_time"])
        ckpt_io.set_rng_state(ck["rng"])
        log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)

    # ---- loop --------------------------------------------------------------------------------------------------
    def fit(self, resume: str | None = None, pretrained: str | None = None,
            match_class_names: bool = False) -> dict[str, float]:
        cfg = self.cfg
        if pretrained:
            from ddetr.interop.finetune import load_pretrained

            report = load_pretrained(self.model, pretrained, class_names=self.train_set.class_names,
                                     match_names=match_class_names)
            log.info("pretrained weights from %s: %s", pretrained, report)
        if resume:
            self.resume(resume)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        model = self.model
        if dist.is_dist():
            model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        train_data = SeededDataset(self.train_set, cfg.seed)
        loader = make_loader(train_data, cfg.batch_size, True, cfg.seed, cfg.data.num_workers)
        val_loader = (make_loader(self.val_set, cfg.batch_size, False, cfg.seed, cfg.data.num_workers)
                      if self.val_set is not None else None)
        writer = self._tensorboard()
        metrics: dict[str, float] = {}
        start = time.monotonic() - self.elapsed
        while self.epoch < cfg.epochs and not self._budget_spent(self.elapsed):
            train_data.epoch = loader.sampler.epoch = self.epoch
            loader.sampler.skip = self.step_in_epoch * cfg.batch_size
            stats = self._train_epoch(model, loader, writer, start)
            budget_spent = self._budget_spent(time.monotonic() - start)
            if budget_spent and self.step_in_epoch < len(loader.sampler) // cfg.batch_size:
                log.info("time budget spent after %d steps of epoch %d", self.step_in_epoch, self.epoch + 1)
            self.epoch += 1
            self.step_in_epoch = 0
            if cfg.time_budget is None:
                self.scheduler.step()
            last = self.epoch >= cfg.epochs or budget_spent
            if val_loader is not None and (self.epoch % cfg.eval_every == 0 or last):
                metrics, _ = evaluate(self.model, self.postprocess, val_loader, self.device, self.amp_dtype)
            self.elapsed = time.monotonic() - start
            self.history.append({"epoch": self.epoch, "time": round(self.elapsed, 1), **stats,
                                 **{f"val_{k}": v for k, v in metrics.items()}})
            self._log_epoch(writer, metrics)
            self.save("last")
            if metrics and metrics.get("AP", -1) > self.best_ap:
                self.best_ap = metrics["AP"]
                self.save("best")
            if last:
                break
        if not metrics and val_loader is not None:  # nothing left to train (resumed a finished run): just score it
            metrics, _ = evaluate(self.model, self.postprocess, val_loader, self.device, self.amp_dtype)
        if dist.is_dist():
            self._check_ranks_in_sync()
        if dist.is_main():
            self._plot()
        if writer is not None:
            writer.close()
        return metrics

    def _train_epoch(self, model, loader, writer, start: float) -> dict[str, float]:
        cfg = self.cfg
        model.train()
        self.criterion.train()
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not dist.is_main(),
                   initial=self.step_in_epoch, total=self.step_in_epoch + len(loader), leave=False)
        t_last = time.monotonic()
        for images, masks, targets in bar:
            images, masks = images.to(self.device), masks.to(self.device)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = model(images, masks)
            losses = self.criterion(outputs, targets)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1} step "
                                         f"{self.step_in_epoch + 1}: {({k: float(v) for k, v in losses.items()})}")
            self.scaler.scale(loss / cfg.accumulate).backward()
            self.step_in_epoch += 1
            if self.step_in_epoch % cfg.accumulate == 0:
                self._optimizer_step()
            for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
                totals[k] = totals.get(k, 0.0) + float(losses[k].detach())
            count += 1
            now = time.monotonic()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", it_s=f"{1 / max(now - t_last, 1e-9):.2f}")
            t_last = now
            if writer is not None:
                writer.add_scalar("train/loss", float(loss.detach()), self.global_step)
            if cfg.checkpoint_every and self.step_in_epoch % cfg.checkpoint_every == 0:
                self.elapsed = time.monotonic() - start
                self.save("last")
            if cfg.time_budget is not None:
                self._time_lr_drop(time.monotonic() - start)
                if self._budget_spent(time.monotonic() - start):
                    break
        if self.step_in_epoch % cfg.accumulate:
            self._optimizer_step()
        return dist.all_reduce_mean({k: v / max(count, 1) for k, v in totals.items()})

    def _optimizer_step(self) -> None:
        if self.cfg.optim.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _check_ranks_in_sync(self) -> None:
        """DDP keeps replicas identical; verify it once at the end (a cheap checksum per rank)."""
        with torch.no_grad():
            checksum = float(sum(p.double().sum() for p in self.model.parameters()))
        log.info("weights checksum rank %d: %.12e", dist.rank(), checksum)
        sums = dist.all_gather_objects(checksum)
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks ended with different weights: checksums {sums}")

    def _time_lr_drop(self, elapsed: float) -> None:
        """With a time budget the lr drops (x0.1) once, after ``lr_drop_fraction`` of the budget."""
        if not self.lr_dropped_by_time and elapsed >= self.cfg.lr_drop_fraction * self.cfg.time_budget:
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.1
            self.lr_dropped_by_time = True
            log.info("time budget: lr dropped x0.1 at %.0fs", elapsed)

    def _budget_spent(self, elapsed: float) -> bool:
        """All ranks agree (rank 0's clock decides) so DDP never waits on a rank that stopped."""
        if self.cfg.time_budget is None:
            return False
        spent = elapsed >= self.cfg.time_budget
        return bool(dist.all_gather_objects(spent)[0]) if dist.is_dist() else spent

    # ---- logging -----------------------------------------------------------------------------------------------
    def _tensorboard(self):
        if not dist.is_main():
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _log_epoch(self, writer, metrics: dict[str, float]) -> None:
        if not dist.is_main():
            return
        entry = self.history[-1]
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if writer is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v):
                    writer.add_scalar(f"epoch/{k}", v, self.epoch)
        ap = f" AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f}" if metrics else ""
        tqdm.write(f"epoch {self.epoch}: loss {entry.get('loss', float('nan')):.4f}{ap} ({self.elapsed:.0f}s)")

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.history:
            return
        epochs = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].plot(epochs, [h.get("loss", float("nan")) for h in self.history])
        ax[0].set(xlabel="epoch", ylabel="train loss", title="loss")
        for key in ("val_AP", "val_AP50"):
            pts = [(h["epoch"], h[key]) for h in self.history if key in h]
            if pts:
                ax[1].plot(*zip(*pts), marker="o", label=key[4:])
        ax[1].set(xlabel="epoch", ylabel="COCO AP", title="validation")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)


def train(cfg: TrainConfig, resume: str | None = None, pretrained: str | None = None,
          match_class_names: bool = False) -> dict[str, float]:
    """Train (and evaluate) one run; returns the final validation metrics (empty without validation data)."""
    try:
        return Trainer(cfg).fit(resume=resume, pretrained=pretrained, match_class_names=match_class_names)
    finally:
        dist.cleanup()
