"""The report of `ddetr bench paper-claims`: results JSON, Table 1-style Markdown, AP50 curves, attention figures."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

METHODS = {
    "demo-detr": "DETR (dense attention, single scale)",
    "demo-single-scale": "Deformable DETR, single scale",
    "demo-multi-scale": "Deformable DETR",
    "demo": "+ iterative bounding box refinement",
    "demo-two-stage": "++ two-stage Deformable DETR",
}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def method(name: str) -> str:
    return METHODS.get(name, name)


def host_info() -> dict[str, Any]:
    """What the timings depend on: library versions, processor, threads, accelerator."""
    return {"torch": torch.__version__, "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _val_images(val_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    coco = json.loads((val_dir / "annotations.json").read_text())
    return coco["images"], coco["annotations"]


@torch.no_grad()
def inference_cost(checkpoint: Path, val_dir: Path, device: torch.device, images: int = 10) -> tuple[int, float]:
    """(parameters, median fp32 ms per image at batch 1 after two warm-up calls) on the first validation images."""
    from ddetr.inference import preprocess, read_image, to_uint8_tensor
    from ddetr.interop import load_model

    model, _, meta = load_model(checkpoint)
    model = model.to(device).eval()
    entries = _val_images(val_dir)[0][:images]
    pixels = [preprocess(to_uint8_tensor(read_image(val_dir / "images" / e["file_name"])), meta["val_size"],
                         meta["max_size"])[None].to(device) for e in entries]
    samples = []
    for i, x in enumerate(pixels[:2] + pixels):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            samples.append((time.perf_counter() - start) * 1e3)
    return sum(p.numel() for p in model.parameters()), statistics.median(samples)


def pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _final(curve: list[dict[str, Any]]) -> dict[str, Any]:
    return curve[-1] if curve else {}


def table(results: dict[str, Any], protocol: str) -> str:
    """One Markdown table in the layout of the paper's Table 1, for the equal-time or the equal-epoch runs."""
    head = ["Method", "preset", "epochs", "training s", *METRICS, "params", "training s/epoch", "inference ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for name, r in results["presets"].items():
        last = _final(r[protocol])
        cells = [r["method"], f"`{name}`", str(last.get("epoch", 0)), f"{last.get('time', 0):.0f}",
                 *(pct(last.get(m)) for m in METRICS), f"{r['params'] / 1e6:.1f}M",
                 f"{r['train_s_per_epoch']:.1f}", f"{r['inference_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_epoch_reaching(curve: list[dict[str, Any]], ap50: float | None) -> int | None:
    if ap50 is None:
        return None
    return next((r["epoch"] for r in curve if r["AP50"] is not None and r["AP50"] >= ap50), None)


def claims(results: dict[str, Any]) -> list[str]:
    """The paper's claims, each as the numbers that test it here (only for the presets that were run)."""
    p = results["presets"]
    out = []
    if "demo-detr" in p:
        target = _final(p["demo-detr"]["epochs"]).get("AP50")
        detr_budget = _final(p["demo-detr"]["budget"]).get("AP50")
        epochs, seconds = results["equal_epochs"], results["settings"]["budget"]
        for name in (n for n in p if n != "demo-detr"):
            reached = first_epoch_reaching(p[name]["epochs"], target) if target else None
            bound = "at least " if reached == 1 else ""  # reached by its first evaluation: the ratio is a bound
            when = (f"at epoch {reached} ({bound}{epochs / reached:.1f}x fewer epochs)" if reached else
                    "(no ratio: DETR's AP50 is 0)" if not target else f"not within {epochs}")
            out.append(f"Convergence: `{name}` reaches DETR's AP50 after {epochs} epochs ({pct(target)}) {when}.")
            budget = _final(p[name]["budget"]).get("AP50")
            out.append(f"Equal time: `{name}` AP50 {pct(budget)} vs DETR {pct(detr_budget)} after {seconds:g} s.")
    pairs = [("demo-single-scale", "demo-multi-scale", "APs", "Multi-scale features help small objects"),
             ("demo-multi-scale", "demo", "AP", "Iterative box refinement adds AP"),
             ("demo", "demo-two-stage", "AP", "Two-stage adds AP")]
    for base, new, metric, claim in pairs:
        if base in p and new in p:
            for protocol, what in (("budget", "equal time"), ("epochs", "equal epochs")):
                a, b = _final(p[base][protocol]).get(metric), _final(p[new][protocol]).get(metric)
                delta = "–" if a is None or b is None else f"{100 * (b - a):+.1f}"
                out.append(f"{claim} ({what}): {metric} `{base}` {pct(a)} -> `{new}` {pct(b)} ({delta}).")
    return out


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    host = results["host"]
    where = host["cuda"] or f"{host['processor']} ({host['cpu_capability']}, {host['threads']} threads)"
    return "\n".join([
        "# Deformable DETR's claims in miniature (`ddetr bench paper-claims`)", "",
        f"Synthetic shapes, {s['num_train']} training / {s['num_val']} validation images of {s['image_size']} px, "
        f"seed {s['seed']}, from scratch on {where}. COCO metrics in % on the validation split (fp32); training "
        "seconds exclude evaluation; inference is fp32 at batch 1.", "",
        f"## (a) Equal training time: {s['budget']:g} s per preset", "", table(results, "budget"), "",
        f"## (b) Equal epochs: {results['equal_epochs']} per preset", "", table(results, "epochs"), "",
        "## The claims, in numbers", "", *(f"- {line}" for line in claims(results)), ""])


def plot(results: dict[str, Any], path: Path) -> None:
    """AP50 against training seconds (equal-time runs) and against epochs (equal-epoch runs); DETR dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["presets"].items():
        style = {"linestyle": "--" if r["dense"] else "-", "marker": "o", "label": f"{r['method']} ({name})"}
        for ax, protocol, x in ((axes[0], "budget", "time"), (axes[1], "epochs", "epoch")):
            curve = r[protocol]
            ax.plot([c[x] for c in curve], [math.nan if c["AP50"] is None else 100 * c["AP50"] for c in curve],
                    **style)
    s = results["settings"]
    axes[0].set(xlabel="training time (s)", ylabel="AP50 (%)", title=f"equal time: {s['budget']:g} s each")
    axes[1].set(xlabel="epoch", ylabel="AP50 (%)", title=f"equal epochs: {results['equal_epochs']} each")
    for ax in axes:
        ax.grid(alpha=0.3)
    epochs = results["equal_epochs"]
    axes[1].set(xlim=(0.5, epochs + 0.5), xticks=range(1, epochs + 1, max(1, epochs // 10)))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(out: Path, results: dict[str, Any]) -> None:
    """OUT/results.json, OUT/table.md and OUT/paper_claims.png."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out / "table.md").write_text(text)
    plot(results, out / "paper_claims.png")
    print(text, flush=True)


def draw_attention(checkpoint: Path, val_dir: Path, out: Path, device: str) -> None:
    """`ddetr visualize` of the validation image with the most objects: the top detections' sampling points and
    attention in the last decoder layer, and the encoder attention of its largest object's centre pixel."""
    from ddetr.cli import visualize

    images, annotations = _val_images(val_dir)
    counts = {img["id"]: 0 for img in images}
    for a in annotations:
        counts[a["image_id"]] += 1
    best = max(images, key=lambda img: (counts[img["id"]], -img["id"]))
    boxes = [a["bbox"] for a in annotations if a["image_id"] == best["id"]]
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3]) if boxes else (0, 0, best["width"], best["height"])
    parser = argparse.ArgumentParser()
    visualize.add_args(parser)  # the command's own defaults, so this call never misses an option
    visualize.run(parser.parse_args(["--checkpoint", str(checkpoint), "--device", device, "--top", "3",
                                     "--encoder-pixel", str(x + w / 2), str(y + h / 2), "--out", str(out),
                                     str(val_dir / "images" / best["file_name"])]))
