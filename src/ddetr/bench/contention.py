"""Training-step time on a quiet CPU and next to one busy process, with the old and the new thread settings.

Each setting runs in its own process (libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it): build the
detector (demo preset by default), warm up, time ``--steps`` training steps (forward, loss, backward, clipping,
AdamW) quiet, then start a competing process that spins one core (pure Python, optionally pinned to one CPU with
``--pin``), time as many steps again, and stop it. Reported: the median step quiet and busy, and their ratio.
Other load on the machine adds to both columns; run it on an otherwise idle machine.

    ddetr bench contention --steps 5              # or: python benchmarks/contention.py --steps 5
    ddetr bench contention --pin --settings old new
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from ddetr.engine.threads import WAIT_VARIABLES

# name -> (environment additions, intra-op threads: a count, "torch" for torch's own choice, or "ddetr" for
# ddetr.engine.threads.configure_cpu_threads, which the CLI runs on CPU)
SETTINGS: dict[str, tuple[dict[str, str], int | str]] = {
    "old": ({}, "torch"),  # torch's defaults: libgomp spins (300000 rounds) before a waiting thread sleeps
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "torch"),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, "torch"),  # a short spin before sleeping
    "spin-1": ({}, 1),
    "passive-1": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    "new": ({"OMP_WAIT_POLICY": "PASSIVE"}, "ddetr"),  # what the ddetr CLI sets up
}
SPIN = "import os, sys\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"


def child(spec: dict) -> dict:
    """Measure one setting in this (fresh) process; returns the medians and what torch ran with."""
    import torch

    from ddetr.engine.config import train_preset
    from ddetr.engine.malloc import keep_freed_memory
    from ddetr.engine.optim import build_optimizer
    from ddetr.engine.threads import configure_cpu_threads
    from ddetr.models import build

    keep_freed_memory()  # as the CLI does on CPU
    if spec["threads"] == "ddetr":
        configure_cpu_threads()
    elif spec["threads"] != "torch":
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = train_preset(spec["preset"])
    model, criterion, _ = build(cfg.detector)
    optimizer = build_optimizer(model, cfg.optim)
    size, batch = spec["size"], spec["batch"]
    images, masks = torch.randn(batch, 3, size, size), torch.zeros(batch, size, size, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.randint(0, cfg.detector.model.num_classes, (3,), generator=gen),
                "boxes": torch.cat([torch.rand(3, 2, generator=gen) * 0.5 + 0.25,
                                    torch.rand(3, 2, generator=gen) * 0.2 + 0.1], 1)} for _ in range(batch)]
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            outputs = model(images, masks)
        criterion(outputs, targets)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):
        step()
    quiet = [step() for _ in range(spec["steps"])]
    pin = [str(max(os.sched_getaffinity(0)))] if spec["pin"] else []
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, *pin])
    try:
        time.sleep(0.5)
        busy = [step() for _ in range(spec["steps"])]
    finally:
        spinner.kill()
        spinner.wait()
    spin = os.environ.get("GOMP_SPINCOUNT")
    wait = os.environ.get("OMP_WAIT_POLICY") or (f"spin {spin}" if spin else "default (spin)")
    return {"threads": torch.get_num_threads(), "wait": wait,
            "quiet_s": statistics.median(quiet), "busy_s": statistics.median(busy)}


def run_setting(name: str, args: argparse.Namespace) -> dict:
    extra, threads = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARIABLES, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(extra)
    spec = {"threads": threads, "preset": args.preset, "size": args.size, "batch": args.batch, "steps": args.steps,
            "amp": args.amp, "pin": args.pin}
    done = subprocess.run([sys.executable, "-m", "ddetr.bench.contention", "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"setting {name!r} failed:\n{done.stderr[-3000:]}")
    return {"setting": name, **json.loads(done.stdout.strip().splitlines()[-1])}


def print_table(rows: list[dict]) -> None:
    base = rows[0]["quiet_s"]
    print("| setting | wait policy | threads | quiet step s | busy step s | busy / quiet "
          f"| busy / {rows[0]['setting']} quiet |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['wait']} | {r['threads']} | {r['quiet_s']:.2f} | {r['busy_s']:.2f} | "
              f"{r['busy_s'] / r['quiet_s']:.1f}x | {r['busy_s'] / base:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddetr bench contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="settings to compare; the first is the baseline of the last column")
    parser.add_argument("--preset", default="demo", help="detector preset (train_preset name)")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, quiet and busy each (median kept)")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype of the forward")
    parser.add_argument("--pin", action="store_true", help="pin the busy process to the last usable CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one setting's JSON spec
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    with open("/proc/loadavg") as f:
        print(f"load average before: {' '.join(f.read().split()[:3])}; usable CPUs: {len(os.sched_getaffinity(0))}")
    rows = []
    for name in args.settings:
        rows.append(run_setting(name, args))
        print(f"  {name}: quiet {rows[-1]['quiet_s']:.2f} s, busy {rows[-1]['busy_s']:.2f} s", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
