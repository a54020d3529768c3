"""The paper's claims in miniature: train every demo-* variant on one synthetic split and compare them (issue #13).

Each preset (DETR with dense attention, single-scale, multi-scale, + refinement, ++ two-stage; the same ResNet-18,
d=128 model otherwise) is trained from scratch twice, on the same data with the same seed: (a) for the same
wall-clock budget and (b) for the same number of epochs (by default as many as `demo` started within the budget, so
the run time stays bounded on any host). The checkpoint of every epoch is scored with COCO AP on the validation
split, outside the training clock. Results: OUT/results.json, OUT/table.md (the paper's Table 1 layout, and the
claims in numbers), OUT/paper_claims.png (AP50 against training time and against epochs) and, next to it, the
`ddetr visualize` PNGs of the trained `demo` on one validation image (sampling points and attention of its top
detections and of an encoder pixel, as in the paper's Figs. 5-6). Runs live in OUT/runs/budget/PRESET and
OUT/runs/epochs-N/PRESET. Re-running the same command resumes: finished runs are skipped, unfinished ones continue
from their last.pth.

    ddetr bench paper-claims --quick   # smoke test of the whole pipeline, < 15 min on a 2-core CPU
    ddetr bench paper-claims           # the real comparison, about 2 h on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddetr.bench import paper_report
from ddetr.cli.common import device_name, keep_freed_memory_on_cpu, non_negative_int, positive_float, positive_int
from ddetr.engine.config import TrainConfig, train_preset
from ddetr.engine.trainer import train
from ddetr.models.config import PRESETS, set_field

ORDER = ("demo-detr", "demo-single-scale", "demo-multi-scale", "demo", "demo-two-stage")
QUICK = {"budget": 40.0, "num_train": 120, "num_val": 50}
FULL = {"budget": 600.0, "num_train": 1000, "num_val": 200}
RECIPE_IMAGE_SIZE = 256  # the demo recipe's sizes (scales 224-288, val 256) are meant for 256 px images
LR_DROP_FRACTION = 0.8  # equal-epoch runs drop the lr after this fraction of the epochs, as budget runs do in time
PROTOCOLS = ("budget", "epochs")


@dataclass
class Settings:
    """Everything the results depend on; stored in OUT/settings.json so that a resumed run cannot mix settings."""

    budget: float
    epochs: int  # 0: as many as `demo` started within the budget
    num_train: int
    num_val: int
    image_size: int
    seed: int
    device: str
    sets: list[str] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def scaled(values: tuple[int, ...], image_size: int) -> tuple[int, ...]:
    return tuple(max(8, round(v * image_size / RECIPE_IMAGE_SIZE)) for v in values)


def train_config(name: str, s: Settings, data: Path, run_dir: Path, epochs: int | None) -> TrainConfig:
    """The demo recipe for `name` on OUT/data, sizes scaled to the images; ``epochs`` None = the time budget run.

    The trainer gets no validation data: every epoch's checkpoint is evaluated here, off the training clock.
    """
    cfg = train_preset(name)
    d = cfg.data
    d.train, d.val = str(data / "train"), None
    d.scales, d.crop_scales = scaled(d.scales, s.image_size), scaled(d.crop_scales, s.image_size)
    d.crop_size, (d.max_size, d.val_size) = scaled(d.crop_size, s.image_size), scaled((d.max_size, d.val_size),
                                                                                       s.image_size)
    cfg.seed, cfg.device, cfg.output_dir = s.seed, s.device, str(run_dir)
    if epochs is None:
        cfg.time_budget = s.budget
    else:
        cfg.time_budget, cfg.epochs = None, epochs
        cfg.optim.lr_drop = max(1, round(LR_DROP_FRACTION * epochs))
    for item in s.sets:
        set_field(cfg, *item.split("=", 1))
    cfg.__post_init__()
    return cfg


def finished_epoch(run_dir: Path) -> dict[str, Any]:
    """The trainer's metrics.jsonl entry of the last finished epoch (written after its last.pth); {} before any."""
    entries = read_jsonl(run_dir / "metrics.jsonl")
    return entries[-1] if entries else {}


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


@torch.no_grad()
def evaluate_checkpoint(path: Path, val_dir: Path, device: torch.device) -> dict[str, float]:
    """COCO metrics of a checkpoint on the validation split (fp32, batch 8, the checkpoint's val size)."""
    from torch.utils.data import DataLoader

    from ddetr.data.coco import CocoDetection
    from ddetr.data.collate import collate
    from ddetr.data.transforms import val_transforms
    from ddetr.evaluation.coco_eval import evaluate_coco, to_coco_results
    from ddetr.interop import load_model
    from ddetr.models.postprocess import PostProcess

    model, cfg, meta = load_model(path)
    model, postprocess = model.to(device).eval(), PostProcess(cfg.top_k)
    annotations = val_dir / "annotations.json"
    dataset = CocoDetection(val_dir / "images", annotations, val_transforms(size=meta["val_size"],
                                                                           max_size=meta["max_size"]))
    results = []
    for images, masks, targets in DataLoader(dataset, batch_size=8, collate_fn=collate):
        outputs = model(images.to(device), masks.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = [{k: v.cpu() for k, v in d.items()} for d in postprocess(outputs, sizes)]
        results += to_coco_results(detections, [int(t["image_id"]) for t in targets], meta["category_ids"])
    return evaluate_coco(annotations, results)


class Bench:
    """Runs (and resumes) every preset under both protocols in OUT, then writes the report."""

    def __init__(self, out: Path, settings: Settings, presets: list[str]) -> None:
        self.out, self.s, self.presets = out, settings, presets
        self.data = out / "data"
        self.device = pick_device(settings.device)
        self.equal = 0  # epochs of the equal-epoch runs, known once the budget runs are done

    def prepare(self) -> None:
        """Check OUT holds a run of these settings (or nothing yet) and write the synthetic dataset once."""
        self.out.mkdir(parents=True, exist_ok=True)
        stored = self.out / "settings.json"
        mine = dataclasses.asdict(self.s)
        if stored.is_file() and json.loads(stored.read_text()) != mine:
            raise ValueError(f"{self.out} holds a run with other settings ({stored.read_text().strip()}); "
                             "use another --out or the same options")
        train_config(self.presets[0], self.s, self.data, self.out, None)  # a bad --set fails now, not in an hour
        stored.write_text(json.dumps(mine, indent=1) + "\n")
        if not (self.data / "val" / "annotations.json").is_file():
            from ddetr.data.synthetic import generate

            print(f"writing the synthetic dataset to {self.data} ...", flush=True)
            generate(self.data, num_train=self.s.num_train, num_val=self.s.num_val, image_size=self.s.image_size,
                     seed=0)

    def run_dir(self, protocol: str, name: str) -> Path:
        """OUT/runs/budget/NAME, or OUT/runs/epochs-N/NAME (a later run with another N does not mix with it)."""
        return self.out / "runs" / (f"epochs-{self.equal}" if protocol == "epochs" else protocol) / name

    def run(self, protocol: str, name: str, epochs: int | None, label: str) -> list[dict[str, Any]]:
        """Train one preset epoch by epoch (one resumable `train` call each), evaluating every epoch's checkpoint.

        Returns the curve: one record per epoch with the training seconds, train loss and COCO metrics.
        """
        run_dir = self.run_dir(protocol, name)
        done, evals_path, last = run_dir / "done.json", run_dir / "evals.jsonl", run_dir / "last.pth"
        if done.is_file():
            print(f"{label}: finished earlier, skipped", flush=True)
            return json.loads(done.read_text())["curve"]
        run_dir.mkdir(parents=True, exist_ok=True)
        if not last.is_file():  # nothing to resume: clear what an attempt that died before its first epoch left
            for stale in ("metrics.jsonl", "evals.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
        while True:
            entry = finished_epoch(run_dir)
            epoch, elapsed = entry.get("epoch", 0), entry.get("time", 0.0)
            curve = {r["epoch"]: r for r in read_jsonl(evals_path)}
            if epoch and epoch not in curve:  # last.pth holds this epoch's weights: score them
                metrics = evaluate_checkpoint(last, self.data / "val", self.device)
                record = {"epoch": epoch, "time": elapsed, "loss": entry.get("loss"),
                          **{k: None if math.isnan(v) else v for k, v in metrics.items()}}  # NaN: no such boxes
                with open(evals_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                curve[epoch] = record
                target = f"{epochs} epochs" if epochs else f"{self.s.budget:g} s"
                print(f"{label}: epoch {epoch}, {elapsed:.0f} s of training (of {target}): "
                      f"AP {paper_report.pct(record['AP'])} AP50 {paper_report.pct(record['AP50'])}", flush=True)
            if epoch >= epochs if epochs else elapsed >= self.s.budget:
                break
            cfg = train_config(name, self.s, self.data, run_dir, epochs)
            cfg.epochs = epoch + 1  # one epoch per call: its checkpoint is scored before the next one starts
            train(cfg, resume=str(last) if last.is_file() else None)
            if finished_epoch(run_dir) == entry:  # nothing left to train (the budget was spent)
                break
        records = [curve[e] for e in sorted(curve)]
        done.write_text(json.dumps({"curve": records}) + "\n")
        return records

    def equal_epochs(self, budget_curves: dict[str, list[dict[str, Any]]]) -> int:
        """--epochs, or as many epochs as `demo` (else the first preset) started within the budget."""
        if self.s.epochs:
            return self.s.epochs
        reference = "demo" if "demo" in budget_curves else self.presets[0]
        return max(1, max((r["epoch"] for r in budget_curves[reference]), default=1))

    def main(self) -> dict[str, Any]:
        self.prepare()
        start = time.monotonic()
        n = 2 * len(self.presets)
        curves: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in PROTOCOLS}
        for i, name in enumerate(self.presets):
            label = f"[{i + 1}/{n}] {name}, equal time ({self.s.budget:g} s)"
            curves["budget"][name] = self.run("budget", name, None, label)
        epochs = self.equal = self.equal_epochs(curves["budget"])
        for i, name in enumerate(self.presets):
            label = f"[{len(self.presets) + i + 1}/{n}] {name}, equal epochs ({epochs})"
            curves["epochs"][name] = self.run("epochs", name, epochs, label)
        models = {name: self.measure_model(name) for name in self.presets}
        results = {"settings": dataclasses.asdict(self.s), "equal_epochs": epochs, "host": paper_report.host_info(),
                   "presets": {name: {"method": paper_report.method(name), "dense": PRESETS[name].model.dense_attention,
                                      **models[name], **{p: curves[p][name] for p in PROTOCOLS}}
                               for name in self.presets}}
        paper_report.write_all(self.out, results)
        if "demo" in self.presets:
            paper_report.draw_attention(self.run_dir("budget", "demo") / "last.pth", self.data / "val",
                                        self.out, str(self.device))
        print(f"paper claims finished in {time.monotonic() - start:.0f} s: {self.out / 'table.md'}, "
              f"{self.out / 'paper_claims.png'}, {self.out / 'results.json'}", flush=True)
        return results

    def measure_model(self, name: str) -> dict[str, Any]:
        """Parameters, training seconds per full epoch (equal-epoch run) and inference ms per image (batch 1)."""
        curve = json.loads((self.run_dir("epochs", name) / "done.json").read_text())["curve"]
        last = self.run_dir("epochs", name) / "last.pth"
        params, ms = paper_report.inference_cost(last, self.data / "val", self.device)
        per_epoch = curve[-1]["time"] / curve[-1]["epoch"] if curve else math.nan
        return {"params": params, "inference_ms": ms, "train_s_per_epoch": per_epoch}


def build_parser() -> argparse.ArgumentParser:
    demo_presets = [n for n in PRESETS if n == "demo" or n.startswith("demo-")]
    p = argparse.ArgumentParser(prog="ddetr bench paper-claims", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/paper-claims", help="folder for data, runs and results (resumable)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller defaults for a smoke test: {QUICK} instead of {FULL}")
    p.add_argument("--presets", nargs="+", default=list(ORDER), choices=demo_presets, metavar="PRESET",
                   help="presets to compare (demo-*)")
    p.add_argument("--budget", type=positive_float, help="training seconds per preset in the equal-time runs")
    p.add_argument("--epochs", type=non_negative_int, default=0,
                   help="epochs per preset in the equal-epoch runs; 0: as many as demo started within the budget")
    p.add_argument("--num-train", type=positive_int, help="synthetic training images")
    p.add_argument("--num-val", type=positive_int, help="synthetic validation images")
    p.add_argument("--image-size", type=positive_int, default=RECIPE_IMAGE_SIZE,
                   help="synthetic image side (>= 32); the recipe's training and val sizes scale with it")
    p.add_argument("--seed", type=int, default=42, help="training seed, the same for every preset")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config field for every preset, e.g. --set batch_size=4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if any("=" not in item for item in args.set):
        raise ValueError(f"--set expects KEY=VALUE, got {args.set}")
    settings = Settings(budget=args.budget or defaults["budget"], epochs=args.epochs,
                        num_train=args.num_train or defaults["num_train"], num_val=args.num_val or defaults["num_val"],
                        image_size=args.image_size, seed=args.seed, device=args.device, sets=list(args.set))
    keep_freed_memory_on_cpu(settings.device)
    Bench(Path(args.out), settings, args.presets).main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
