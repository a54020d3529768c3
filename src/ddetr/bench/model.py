"""Benchmark the whole detector next to HF's DeformableDetrForObjectDetection: same config, same weights.

Per preset and batch size: fp32 inference (eval, no_grad) time and peak memory; bf16-autocast inference time
and how far its logits/boxes move from fp32; one training step (forward + loss + backward; ours in channels_last
as `ddetr train` runs it) time and peak memory; and where the fp32 inference time goes (backbone, encoder,
decoder, the rest: input projections, position embeddings, proposals, heads), measured with forward hooks. Times
are the fastest of ``--repeats`` calls after a warm-up, ours and HF alternating (other processes' load only ever
adds time).
Our weights are loaded into HF through ``ddetr.interop.hf`` and the fp32 outputs of both are compared, so
the two time the same network. CPU memory is the growth of the process's peak RSS during one call (Linux:
the high-water mark is reset through /proc/self/clear_refs after freed memory is returned with malloc_trim);
CUDA memory is max_memory_allocated minus what was allocated before the call. Images are random, unpadded,
of one size. By default glibc serves each large buffer with a fresh ``mmap`` (every call page-faults it anew, as
in a user's own script); ``--keep-freed-memory`` keeps freed memory in the heap for the whole process, ours and
HF alike, as ddetr's CPU commands do. HF's times drop more than ours with it (its step allocates more).

    ddetr bench model --quick                              # 256x320 smoke test, all paper presets
    ddetr bench model --presets deformable-detr --batch 1  # 800x1333 (or: python benchmarks/model.py ...)
    ddetr bench model --device cuda --threads 8
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn

import ddetr.ops
from ddetr.bench.model_tables import print_tables
from ddetr.engine.device import native_bf16
from ddetr.engine.malloc import keep_freed_memory
from ddetr.interop.hf import ours_to_hf, ours_to_hf_config, v4_to_v5
from ddetr.models import DeformableDETR, build, preset
from ddetr.models.inference_ready import prepare_for_inference

PAPER_PRESETS = ["deformable-detr", "deformable-detr-single-scale", "deformable-detr-single-scale-dc5",
                 "deformable-detr-refine", "deformable-detr-two-stage"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@dataclass
class Result:
    """One implementation's measurement: fastest call, peak memory of one call, warm-up output, time split."""

    best_s: float
    peak_mib: float
    output: object
    parts: dict[str, float] | None  # seconds inside each timed submodule during the fastest call


def _memory_base(device: torch.device) -> float:
    """Start a peak-memory window; returns the baseline in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so that reuse shows up as growth
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    return _rss_kb("VmRSS") / 2**10


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_kb("VmHWM") / 2**10


def measure(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
            timers: dict[str, PartTimer] | None = None) -> dict[str, Result]:
    """Warm up each function, then time ``repeats`` rounds that alternate between them (A B A B ...), so
    that load from other processes hits every implementation alike; the fastest call of each is kept."""
    timers = timers or {}
    outputs = {name: fn() for name, fn in fns.items()}
    best: dict[str, tuple[float, dict[str, float] | None]] = dict.fromkeys(fns, (math.inf, None))
    peaks = {}
    for i in range(repeats):
        for name, fn in fns.items():
            timer = timers.get(name)
            before = dict(timer.totals) if timer else {}
            base = _memory_base(device) if i == 0 else 0.0
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - start
            if i == 0:
                peaks[name] = _memory_peak(device) - base
            if elapsed < best[name][0]:
                parts = {k: timer.totals[k] - before[k] for k in before} if timer else None
                best[name] = elapsed, parts
    return {name: Result(best[name][0], peaks[name], outputs[name], best[name][1]) for name in fns}


def matched_diffs(ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
                  ) -> tuple[float, float]:
    """Max abs difference of (logits, boxes) between each query of ``ref`` and its closest query of ``other``.

    Query order is ignored: two-stage ranks proposals by score, and near-tied scores may swap two queries
    between implementations or precisions without changing any detection.
    """
    a = torch.cat([t.float() for t in ref], -1)
    b = torch.cat([t.float() for t in other], -1)
    nearest = (a[:, :, None] - b[:, None]).abs().amax(-1).argmin(-1)  # (B, Q)
    b = torch.gather(b, 1, nearest[..., None].expand_as(b))
    n = ref[0].shape[-1]
    return (a[..., :n] - b[..., :n]).abs().max().item(), (a[..., n:] - b[..., n:]).abs().max().item()


class PartTimer:
    """Accumulates the wall time spent inside named groups of submodules (forward pre-hook to forward hook). A call
    made inside another timed call (the heads inside a refining decoder) counts for the outer part only."""

    def __init__(self, parts: dict[str, list[nn.Module]], device: torch.device) -> None:
        self.totals = dict.fromkeys(parts, 0.0)
        self._open: list[tuple[nn.Module, str, float]] = []  # the outermost timed call in progress, if any
        self._handles = []
        for name, modules in parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._pre(name, device)))
                self._handles.append(module.register_forward_hook(self._post(device)))

    def _pre(self, name: str, device: torch.device):
        def hook(module, args):
            if not self._open:
                sync(device)
                self._open.append((module, name, time.perf_counter()))
        return hook

    def _post(self, device: torch.device):
        def hook(module, args, output):
            if self._open and self._open[0][0] is module:
                sync(device)
                _, name, start = self._open.pop()
                self.totals[name] += time.perf_counter() - start
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def split(backbone: nn.Module, encoder: nn.Module, decoder: nn.Module, heads: list[nn.Module],
          ) -> dict[str, list[nn.Module]]:
    return {"backbone": [backbone], "encoder": [encoder], "decoder": [decoder], "heads": heads}


def hf_twin(model: DeformableDETR, device: torch.device) -> nn.Module:
    """HF's model with our weights. Refinement needs untied heads: HF's default ties class_embed.1-5 to 0."""
    cfg = model.cfg
    config = ours_to_hf_config(cfg)
    config["tie_word_embeddings"] = not cfg.with_box_refine
    hf = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig.from_dict(config))
    state = {v4_to_v5(k): v for k, v in ours_to_hf(model.state_dict(), cfg).items()}
    hf.load_state_dict(state, strict=True)
    return hf.to(device)


def as_pair(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, boxes) from our output dict or HF's output object."""
    return (out.logits, out.pred_boxes) if hasattr(out, "logits") else (out["pred_logits"], out["pred_boxes"])


def random_targets(batch: int, num_classes: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        centre = torch.rand(3, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(3, 2, generator=gen) * 0.3 + 0.05
        labels = torch.randint(1, num_classes, (3,), generator=gen)
        out.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1).to(device)})
    return out


def bench_preset(name: str, batch: int, size: tuple[int, int], device: torch.device, repeats: int,
                 train_precisions: tuple[str, ...] = ("fp32", "bf16"), bf16: bool = True) -> dict:
    """Every measurement for one preset and batch size; HF columns are None for the dense baseline.

    ``train_precisions``: the training steps to time, "fp32" and/or "bf16" (autocast); none skips training.
    ``bf16``: also time bf16-autocast inference.
    """
    torch.manual_seed(0)
    cfg = preset(name)
    model, criterion, postprocess = build(cfg, backbone_weights=False)  # random weights: timing only
    model.to(device)
    hf = None if cfg.model.dense_attention else hf_twin(model, device)
    images = torch.randn(batch, 3, *size, device=device)
    masks = torch.zeros(batch, *size, dtype=torch.bool, device=device)
    pixel_mask = (~masks).long()
    targets = random_targets(batch, cfg.model.num_classes, device)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    row: dict = {"preset": name, "batch": batch}

    def ours_step(amp: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(images, masks), targets)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    def hf_step(amp: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = hf(pixel_values=images, pixel_mask=pixel_mask, labels=hf_labels).loss
        loss.backward()
        hf.zero_grad(set_to_none=True)

    ready = prepare_for_inference(copy.deepcopy(model))  # what Detector, predict and eval run
    nets = {"ours": model}
    forward = {"ours": lambda: model(images, masks), "ready": lambda: ready(images, masks)}
    step = {"ours": ours_step}
    timers = {impl: PartTimer(split(net.backbone, net.transformer.encoder, net.transformer.decoder,
                                    [*net.class_embed, *net.bbox_embed]), device)
              for impl, net in (("ours", model), ("ready", ready))}
    if hf is not None:
        nets["hf"] = hf
        forward["hf"] = lambda: hf(pixel_values=images, pixel_mask=pixel_mask)
        step["hf"] = hf_step
        timers["hf"] = PartTimer(split(hf.model.backbone, hf.model.encoder, hf.model.decoder,
                                       [*hf.class_embed, *hf.bbox_embed]), device)

    for net in nets.values():
        net.eval()
    with torch.no_grad():
        fp32 = measure(forward, device, repeats, timers)
        for timer in timers.values():
            timer.remove()
        low_forward = {}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for impl, fwd in forward.items() if bf16 else ():
                try:
                    fwd()
                    low_forward[impl] = fwd
                except Exception as exc:  # noqa: BLE001 - report a failing peer in the table, go on
                    row[f"{impl}_bf16_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            low = measure(low_forward, device, repeats)
        sizes = torch.tensor([list(size)] * batch, device=device)
        post = {"ours": lambda: postprocess(fp32["ours"].output, sizes)}
        if hf is not None:
            processor = transformers.DeformableDetrImageProcessor()
            post["hf"] = lambda: processor.post_process_object_detection(fp32["hf"].output, 0.0, sizes, top_k=100)
        post_s = measure(post, device, max(repeats, 5))
    model.use_channels_last()  # ours trains as `ddetr train` runs it; HF as its models come
    for net in nets.values():
        net.train()
    train = {precision: measure({impl: partial(fn, precision == "bf16") for impl, fn in step.items()}, device,
                                repeats)
             for precision in train_precisions}
    for impl, result in post_s.items():
        row[f"{impl}_post_s"] = result.best_s

    for impl in forward:
        row[f"{impl}_fp32_s"], row[f"{impl}_fp32_mib"] = fp32[impl].best_s, fp32[impl].peak_mib
        parts = fp32[impl].parts
        row[f"{impl}_parts"] = {**parts, "rest": fp32[impl].best_s - sum(parts.values()),
                                "post-processing": row.get(f"{impl}_post_s", row["ours_post_s"])}
        for precision, results in train.items():
            if impl in results:
                row[f"{impl}_train_{precision}_s"] = results[impl].best_s
                row[f"{impl}_train_{precision}_mib"] = results[impl].peak_mib
        if impl in low:
            row[f"{impl}_bf16_s"] = low[impl].best_s
            diffs = matched_diffs(as_pair(fp32[impl].output), as_pair(low[impl].output))
            row[f"{impl}_bf16_dlogits"], row[f"{impl}_bf16_dboxes"] = diffs
    row["ready_logits"], row["ready_boxes"] = matched_diffs(as_pair(fp32["ours"].output),
                                                            as_pair(fp32["ready"].output))
    if hf is not None:
        row["parity_logits"], row["parity_boxes"] = matched_diffs(as_pair(fp32["ours"].output),
                                                                  as_pair(fp32["hf"].output))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddetr bench model", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PAPER_PRESETS,
                        help="preset names (detr-baseline has no HF twin: ours only)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, after a warm-up")
    parser.add_argument("--train", nargs="+", choices=["fp32", "bf16", "none"], default=["fp32", "bf16"],
                        help="training steps to time, ours in channels_last as `ddetr train` runs it (none: "
                             "inference only, e.g. for batch sizes whose HF training step does not fit in memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="time bf16 autocast (inference, and training if --train has bf16): auto = where the "
                             "device computes bf16 natively (emulated bf16 on a CPU without AVX512-BF16/AMX is "
                             "several times slower than fp32 and measures PyTorch's emulation, not the model)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the heap, as ddetr's CPU commands do (train, eval, predict, "
                             "demo; process-wide: HF gets it too); default: glibc's, as a user's own script has it")
    parser.add_argument("--quick", action="store_true", help="256x320 images: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = [256, 320]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept = args.keep_freed_memory and device.type == "cpu" and keep_freed_memory()
    probe = torch.empty(0, device=device)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device} ({cpu}), "
          f"{torch.get_num_threads()} threads, image {args.size[0]}x{args.size[1]}, best of {args.repeats} "
          f"after a warm-up, {'freed memory kept in the heap' if kept else 'default allocator'}; "
          f"our MSDA backends available: {ddetr.ops.available_backends(probe)}")
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and native_bf16(device))
    if not bf16:
        print(f"bf16 not timed: {'--bf16 no' if args.bf16 == 'no' else 'this CPU has no bf16 instructions'}")
    train = tuple(p for p in args.train if p != "none" and (bf16 or p != "bf16"))
    rows = []
    for name in args.presets:
        for batch in args.batch:
            print(f"... {name} batch {batch}", flush=True)
            rows.append(bench_preset(name, batch, tuple(args.size), device, args.repeats, train, bf16))
    print_tables(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
