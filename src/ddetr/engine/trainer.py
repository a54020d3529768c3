"""The training loop: the paper's recipe, AMP, accumulation, DDP, atomic resumable checkpoints, logs and curves."""

from __future__ import annotations

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
from ddetr.engine import run as run_rules
from ddetr.engine.config import TrainConfig
from ddetr.engine.data import SeededDataset, build_datasets, make_loader
from ddetr.engine.device import AMP_DTYPES, resolve_amp, resolve_device
from ddetr.engine.evaluate import evaluate
from ddetr.engine.faults import kill_point
from ddetr.engine.logs import plot_curves, write_metrics
from ddetr.engine.optim import build_optimizer, build_scheduler
from ddetr.engine.state import LOSS_KEYS, TimeBudget, TrainState, json_safe
from ddetr.models import build
from ddetr.models.config import save_config

log = logging.getLogger("ddetr.train")
STATEFUL = ("optimizer", "scheduler", "scaler")  # objects with state_dict/load_state_dict saved in last.pth


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns one run: ``Trainer(cfg, resume=...).fit()`` trains, evaluates and checkpoints into ``cfg.output_dir``.

    ``resume`` continues from a ``last.pth`` written with the same config (only ``epochs`` and ``time_budget`` may
    differ); ``pretrained`` starts from weights; a folder that already holds a run is refused unless it is the one
    resumed or ``overwrite`` is set (its run files are then deleted before training starts).
    """

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, pretrained: str | Path | None = None,
                 match_class_names: bool = False, overwrite: bool = False) -> None:
        if resume and (pretrained or overwrite):
            other = "--pretrained" if pretrained else "--overwrite"
            raise ValueError(f"--resume {resume}: cannot be combined with {other} (a resumed run continues from its "
                             "own weights, in its own folder)")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        amp = resolve_amp(cfg.amp, self.device)
        self._clear_folder = run_rules.check_folder(self.out, resume, overwrite)
        ckpt = run_rules.read_training_checkpoint(resume) if resume else None
        dist.init_from_env(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_all(cfg.seed + dist.rank())
        self.train_set, self.val_set = build_datasets(cfg.data)
        if self.train_set is None:
            raise ValueError("training needs a train dataset (--data DIR, or --train-images and --train-annotations)")
        if cfg.detector.model.num_classes != self.train_set.num_classes:
            log.info("num_classes set to %d from %s", self.train_set.num_classes, self.train_set.annotations_json)
            cfg.detector.model.num_classes = self.train_set.num_classes
        if ckpt is not None:
            differences = run_rules.config_diff(run_rules.saved_config(ckpt, resume), cfg)
            if differences:
                raise ValueError(f"{resume}: the run was saved with another config ({'; '.join(differences)}); "
                                 "only epochs and time_budget may change on resume")
        # A resumed run or a --pretrained checkpoint brings its own backbone weights: no ImageNet file needed then.
        own_weights = ckpt is not None or pretrained is not None
        self.model, self.criterion, self.postprocess = build(cfg.detector, backbone_weights=not own_weights)
        self.model.use_channels_last().to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.lr_drop)
        if amp != cfg.amp:
            log.info("amp %s: %s on %s", cfg.amp, amp, self.device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.state = TrainState()
        self._rng: dict[str, Any] | None = None  # restored where the saved run stood: see `_restore_rng`
        if ckpt is not None:
            self._restore(ckpt, resume)
        elif pretrained:
            from ddetr.interop.finetune import load_pretrained

            report = load_pretrained(self.model, pretrained, class_names=self.train_set.class_names,
                                     match_names=match_class_names)
            log.info("pretrained weights from %s: %s", pretrained, report)
        self._summaries = {name: self._data_summary(name) for name in ("train", "val")}
        self._speed: dict[str, float] = {}  # this epoch's steps/s and share of time waiting for data (not saved)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self, weights_only: bool = False) -> dict[str, Any]:
        """What ``best.pth`` (weights + metadata) and ``last.pth`` (+ optimiser, schedule, progress, RNG) hold.

        Collective under DDP (the running loss sums are averaged over ranks): every rank calls it.
        """
        data = self.cfg.data
        ckpt = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": self.cfg.detector.to_dict(),
                "train_config": self.cfg.to_dict(),
                "model": {k: v.contiguous() for k, v in self.model.state_dict().items()},
                "class_names": self.train_set.class_names, "category_ids": self.train_set.category_ids,
                "val_size": data.val_size, "max_size": data.max_size}
        if weights_only:
            return ckpt
        state = self.state.to_dict()
        state["loss_sums"] = self._rank_mean(self.state.loss_sums)
        return {**ckpt, **{key: getattr(self, key).state_dict() for key in STATEFUL}, "train_state": state,
                "rng": ckpt_io.rng_state()}

    def save(self, name: str) -> None:
        """Write ``name.pth`` (``best``: weights only); refuses to save weights that are no longer finite."""
        weights_only = name == "best"
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise FloatingPointError(f"weights became non-finite by epoch {self.state.epoch + 1} step "
                                     f"{self.state.step_in_epoch}: training stopped, {self.out / name}.pth not "
                                     "written (the previous one is kept)")
        ckpt = self.checkpoint(weights_only)
        if dist.is_main():
            ckpt_io.save_atomic(ckpt, self.out / f"{name}.pth")

    def _restore(self, ckpt: dict[str, Any], path: str | Path) -> None:
        from ddetr.interop.load import load_state_strict

        load_state_strict(self.model, ckpt["model"], str(path))
        for key in STATEFUL:
            try:
                getattr(self, key).load_state_dict(ckpt[key])
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"{path}: its {key} state does not fit this model ({reason})") from None
        try:
            self.state = TrainState.from_checkpoint(ckpt)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: damaged training state ({exc})") from None
        self._rng = ckpt.get("rng")
        log.info("resumed from %s at epoch %d step %d", path, self.state.epoch, self.state.step_in_epoch)

    def _restore_rng(self) -> None:
        """Put back the saved RNG state once, at the point of the loop where it was saved (so dropout and the
        loaders draw exactly what the uninterrupted run drew)."""
        if self._rng is not None:
            ckpt_io.set_rng_state(self._rng)
            self._rng = None

    # ---- loop --------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until ``epochs`` or the time budget; returns the last validation metrics (empty without val data)."""
        cfg, st = self.cfg, self.state
        if dist.is_main():
            if self._clear_folder:
                run_rules.clear_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_temp_files(self.out)
            save_config(cfg, self.out / "config.yaml")
            if st.history or (self.out / "metrics.jsonl").exists():
                self._write_log()  # a crash after a checkpoint may have left lines the resumed run writes again
        dist.barrier()
        model = self.model
        if dist.is_dist():
            model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        train_data = SeededDataset(self.train_set, cfg.seed)
        loader = make_loader(train_data, cfg.batch_size, True, cfg.seed, cfg.data.num_workers)
        val_loader = (make_loader(self.val_set, cfg.batch_size, False, cfg.seed, cfg.data.num_workers)
                      if self.val_set is not None else None)
        writer = self._tensorboard()
        budget = TimeBudget(cfg.time_budget, cfg.lr_drop_fraction, st.elapsed)
        if st.step_in_epoch == 0:
            self._restore_rng()
        metrics: dict[str, float] = {}
        while True:
            if st.epoch_trained:
                metrics = self._close_epoch(val_loader, budget, writer)
            if st.epoch >= cfg.epochs or budget.spent():
                break
            train_data.epoch = loader.sampler.epoch = st.epoch
            loader.sampler.skip = st.step_in_epoch * cfg.batch_size
            self._train_epoch(model, loader, budget, writer)
        if not metrics and val_loader is not None:  # nothing left to train (resumed a finished run): just score it
            metrics, _ = evaluate(self.model, self.postprocess, val_loader, self.device,
                                  self.train_set.category_ids, self.amp_dtype)
        if dist.is_dist():
            self._check_ranks_in_sync()
        if dist.is_main():
            for name in ("train", "val"):
                if summary := self._data_summary(name):
                    tqdm.write(f"{name} data: {summary}")
            plot_curves(self.state.history, self.out / "curves.png")
        if writer is not None:
            writer.close()
        return metrics

    def _train_epoch(self, model, loader, budget: TimeBudget, writer) -> None:
        """Train (the rest of) epoch ``state.epoch + 1``; a checkpoint is written before its evaluation."""
        cfg, st = self.cfg, self.state
        model.train()
        self.criterion.train()
        batches = iter(loader)
        self._restore_rng()  # a mid-epoch checkpoint was saved after its loader had started
        bar = tqdm(batches, desc=f"epoch {st.epoch + 1}/{cfg.epochs}", disable=not dist.is_main(),
                   initial=st.step_in_epoch, total=st.step_in_epoch + len(loader), leave=False)
        start = ready = time.perf_counter()
        waited, steps = 0.0, 0
        for images, masks, targets in bar:
            waited += time.perf_counter() - ready  # the loader had not yet decoded and augmented this batch
            images, masks = images.to(self.device), masks.to(self.device)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = model(images, masks)
            losses, values, problem = self._losses(outputs, targets)
            self._stop_if(problem)
            self.scaler.scale(losses["loss"] / cfg.accumulate).backward()
            kill_point("step")
            st.step_in_epoch += 1
            st.add_losses(values)
            if st.step_in_epoch % cfg.accumulate == 0:
                self._optimizer_step()
                if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0:
                    st.elapsed = budget.elapsed()
                    self.save("last")
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            if writer is not None:
                writer.add_scalar("train/loss", values["loss"], st.global_step)
            steps += 1
            if budget.check_step(st, self.optimizer):
                if st.step_in_epoch < len(loader.sampler) // cfg.batch_size:
                    log.info("time budget spent after %d steps of epoch %d", st.step_in_epoch, st.epoch + 1)
                break
            ready = time.perf_counter()
        seconds = max(time.perf_counter() - start, 1e-9)
        self._speed = {"steps_per_s": round(steps / seconds, 3), "data_wait": round(waited / seconds, 3)}
        if st.step_in_epoch % cfg.accumulate:
            self._optimizer_step()
        st.loss_sums = self._rank_mean(st.loss_sums)
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_trained = True
        if cfg.time_budget is None:
            self.scheduler.step()
        st.elapsed = budget.elapsed()
        if self._evaluation_due(budget):
            self.save("last")  # a crash during the evaluation then costs only the evaluation

    def _evaluation_due(self, budget: TimeBudget) -> bool:
        epoch = self.state.epoch
        return self.val_set is not None and (epoch % self.cfg.eval_every == 0 or epoch >= self.cfg.epochs
                                             or budget.spent())

    def _close_epoch(self, val_loader, budget: TimeBudget, writer) -> dict[str, float]:
        """Evaluate the epoch just trained (when due), log it once, keep the best weights, checkpoint."""
        st = self.state
        metrics: dict[str, float] = {}
        if val_loader is not None and self._evaluation_due(budget):
            kill_point("evaluate")
            metrics, _ = evaluate(self.model, self.postprocess, val_loader, self.device,
                                  self.train_set.category_ids, self.amp_dtype)
        st.elapsed = budget.elapsed()
        entry = {"epoch": st.epoch, "time": round(st.elapsed, 1), **self._speed, **st.epoch_losses(),
                 **{f"val_{k}": v for k, v in metrics.items()}}
        st.history.append(json_safe(entry))
        st.epoch_trained, st.loss_sums, st.loss_count = False, {}, 0
        if metrics and metrics.get("AP", -1.0) > st.best_ap:
            st.best_ap = metrics["AP"]
            self.save("best")  # before last.pth: a crash in between redoes this evaluation and writes it again
        self.save("last")
        if dist.is_main():
            self._write_log()
            self._log_epoch(writer, metrics)
        return metrics

    def _losses(self, outputs: dict[str, Any], targets: list[dict],
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], str | None]:
        """The criterion's losses, the logged ones as floats, and what is not finite (None when all is)."""
        try:
            losses = self.criterion(outputs, targets)
        except ValueError:  # the matcher refuses NaN/inf predictions: say where training diverged
            if all(bool(torch.isfinite(outputs[k]).all()) for k in ("pred_logits", "pred_boxes")):
                raise
            return {}, {}, "the predictions are not finite"
        keys = [k for k in LOSS_KEYS if k in losses]
        values = dict(zip(keys, torch.stack([losses[k].detach().float() for k in keys]).tolist()))
        if all(math.isfinite(v) for v in values.values()):
            return losses, values, None
        return losses, values, f"the loss is not finite ({', '.join(f'{k} {v:.4g}' for k, v in values.items())})"

    def _stop_if(self, problem: str | None) -> None:
        """A non-finite loss stops training (as the official code) on every rank, before it can touch the weights."""
        failed = problem is not None
        if dist.is_dist():
            flag = torch.tensor([float(failed)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            failed = float(flag) > 0
        if failed:
            last = self.out / "last.pth"
            kept = f"{last} is the last checkpoint" if last.is_file() else "no checkpoint was written"
            raise FloatingPointError(f"{problem or 'another rank diverged'} at epoch {self.state.epoch + 1} step "
                                     f"{self.state.step_in_epoch + 1}: training stopped, nothing saved from this step "
                                     f"({kept})")

    def _rank_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (identity without DDP); collective."""
        if not dist.is_dist() or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / dist.world_size() for k, v in zip(keys, t.tolist())}

    def _optimizer_step(self) -> None:
        if self.cfg.optim.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    def _check_ranks_in_sync(self) -> None:
        """DDP keeps replicas identical; verify it once at the end (a cheap checksum per rank)."""
        with torch.no_grad():
            checksum = float(sum(p.double().sum() for p in self.model.parameters()))
        log.info("weights checksum rank %d: %.12e", dist.rank(), checksum)
        sums = dist.all_gather_objects(checksum)
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks ended with different weights: checksums {sums}")

    # ---- logging -----------------------------------------------------------------------------------------------
    def _data_summary(self, name: str) -> str:
        """The dataset's one-line count of skipped entries and images (empty when nothing was skipped)."""
        data = self.train_set if name == "train" else self.val_set
        summary = getattr(data, "skip_summary", None)
        return f"{data.annotations_json}: {text}" if summary is not None and (text := summary()) else ""

    def _tensorboard(self):
        if not dist.is_main():
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.out / "tensorboard"))
        except (ImportError, OSError) as exc:  # logging must never stop training
            log.warning("no TensorBoard logs: %s", exc)
            return None

    def _write_log(self) -> None:
        write_metrics(self.state.history, self.out / "metrics.jsonl")

    def _log_epoch(self, writer, metrics: dict[str, float]) -> None:
        entry = self.state.history[-1]
        if writer is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(f"epoch/{k}", v, entry["epoch"])
        loss = entry.get("loss")
        ap = f" AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f}" if metrics else ""
        speed = (f"; {entry['steps_per_s']:.2f} steps/s, {entry['data_wait']:.0%} of it waiting for data"
                 if "steps_per_s" in entry else "")
        tqdm.write(f"epoch {entry['epoch']}: loss {'n/a' if loss is None else f'{loss:.4f}'}{ap} "
                   f"({self.state.elapsed:.0f}s{speed})")
        for name in ("train", "val"):
            summary = self._data_summary(name)
            if summary != self._summaries[name]:
                tqdm.write(f"{name} data: {summary}")
                self._summaries[name] = summary


def train(cfg: TrainConfig, resume: str | None = None, pretrained: str | None = None,
          match_class_names: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Train (and evaluate) one run; returns the final validation metrics (empty without validation data)."""
    try:
        return Trainer(cfg, resume, pretrained, match_class_names, overwrite).fit()
    finally:
        dist.cleanup()
