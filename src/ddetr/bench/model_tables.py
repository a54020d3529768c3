"""The tables `ddetr bench model` prints from its measurement rows (one dict per preset and batch size)."""

from __future__ import annotations


def fmt(value: float | None, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    value *= scale
    return f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


def ratio(row: dict, key: str, impl: str = "ours") -> str:
    """HF / ours for one measurement: > 1 means ours is faster (or smaller)."""
    hf, ours = row.get(f"hf_{key}"), row.get(f"{impl}_{key}")
    return "—" if hf is None or ours is None else f"{hf / ours:.2f}x"


def bf16_cell(row: dict, impl: str) -> str:
    if f"{impl}_bf16_error" in row:
        return f"failed: {row[f'{impl}_bf16_error']}"
    if f"{impl}_bf16_dlogits" not in row:
        return "—"
    return f"{row[f'{impl}_bf16_dlogits']:.3f} / {row[f'{impl}_bf16_dboxes']:.3f}"


def table(title: str, header: list[str], lines: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def print_tables(rows: list[dict]) -> None:
    key = [[r["preset"], str(r["batch"])] for r in rows]
    table("fp32 inference (eval, no_grad); ready: prepared for inference as Detector/predict/eval run it "
          "(BatchNorm folded, channels_last); differences: max abs (logits, boxes), query order free",
          ["preset", "batch", "ours ms", "ready ms", "HF ms", "HF/ours", "HF/ready", "ready img/s", "HF img/s",
           "ours peak MiB", "HF peak MiB", "ours vs HF", "ready vs ours"],
          [k + [fmt(r["ours_fp32_s"], 1e3), fmt(r["ready_fp32_s"], 1e3), fmt(r.get("hf_fp32_s"), 1e3),
                ratio(r, "fp32_s"), ratio(r, "fp32_s", "ready"), f"{r['batch'] / r['ready_fp32_s']:.2f}",
                f"{r['batch'] / r['hf_fp32_s']:.2f}" if "hf_fp32_s" in r else "—",
                fmt(r["ours_fp32_mib"]), fmt(r.get("hf_fp32_mib")),
                f"{r['parity_logits']:.1e}, {r['parity_boxes']:.1e}" if "parity_logits" in r else "—",
                f"{r['ready_logits']:.1e}, {r['ready_boxes']:.1e}"]
           for k, r in zip(key, rows)])
    if any(k.endswith(("_bf16_s", "_bf16_error")) for r in rows for k in r):  # bf16 was timed (or failed)
        bf16_table(key, rows)
    train_table(key, rows)
    split_table(key, rows)


def bf16_table(key: list[list[str]], rows: list[dict]) -> None:
    table("bf16 autocast inference (HF/ready: against HF's bf16; vs HF fp32: against HF's fp32); change: max abs vs "
          "fp32 of logits / boxes, query order free",
          ["preset", "batch", "ours ms", "ready ms", "HF ms", "HF/ready", "HF fp32 / ready", "ready change",
           "HF change"],
          [k + [fmt(r.get("ours_bf16_s"), 1e3), fmt(r.get("ready_bf16_s"), 1e3), fmt(r.get("hf_bf16_s"), 1e3),
                ratio(r, "bf16_s", "ready"),
                f"{r['hf_fp32_s'] / r['ready_bf16_s']:.2f}x" if "hf_fp32_s" in r and "ready_bf16_s" in r else "—",
                bf16_cell(r, "ready"), bf16_cell(r, "hf")] for k, r in zip(key, rows)])


def train_table(key: list[list[str]], rows: list[dict]) -> None:
    if any("ours_train_fp32_s" in r or "ours_train_bf16_s" in r for r in rows):
        table("one training step (train mode: forward + loss + backward; bf16: forward and loss under autocast)",
              ["preset", "batch", "precision", "ours ms", "HF ms", "HF/ours", "ours peak MiB", "HF peak MiB",
               "HF/ours mem"],
              [k + [p, fmt(r[f"ours_train_{p}_s"], 1e3), fmt(r.get(f"hf_train_{p}_s"), 1e3), ratio(r, f"train_{p}_s"),
                    fmt(r[f"ours_train_{p}_mib"]), fmt(r.get(f"hf_train_{p}_mib")), ratio(r, f"train_{p}_mib")]
               for k, r in zip(key, rows) for p in ("fp32", "bf16") if f"ours_train_{p}_s" in r])


def split_table(key: list[list[str]], rows: list[dict]) -> None:
    lines = []
    for k, r in zip(key, rows):
        for impl in ("ours", "ready", "hf"):
            if f"{impl}_parts" in r:
                parts = r[f"{impl}_parts"]
                cells = [fmt(v, 1e3) for v in parts.values()]
                lines.append(k + [impl] + cells + [fmt(sum(parts.values()), 1e3)])
    table("where the fastest fp32 inference call spent its time, ms (heads: outside the decoder; rest: input "
          "projections, positions, query and proposal selection); post-processing (top-k, boxes to pixels: "
          "ours, or HF's post_process_object_detection) is timed on its own and included in the total",
          ["preset", "batch", "impl", "backbone", "encoder", "decoder", "heads", "rest", "post-processing", "total"],
          lines)
