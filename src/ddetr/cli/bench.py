"""`ddetr bench op | model | paper-claims | contention | predict | step-ops`: the benchmarks of ddetr.bench."""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module of ddetr.bench with main(argv), one-line help)
SUBCOMMANDS = {
    "op": ("op", "the MSDeformAttn operator: every backend next to HF's grid_sample path"),
    "model": ("model", "the whole detector next to HF's: inference, bf16 and one training step"),
    "paper-claims": ("paper_claims", "the paper's Table 1/2 and convergence claims in miniature (demo-* presets)"),
    "contention": ("contention", "a training step on a quiet CPU and next to a busy process, per thread setting"),
    "predict": ("predict", "images/s of the predict loop (batched, threads decoding ahead) vs one at a time"),
    "step-ops": ("step_ops", "where a training step's time goes per kind of operator, with GFLOP/s, ours and HF's"),
}


def add_args(p: argparse.ArgumentParser) -> None:
    listing = "; ".join(f"{name}: {text}" for name, (_, text) in SUBCOMMANDS.items())
    p.add_argument("bench_args", nargs="*", metavar="SUBCOMMAND [OPTION]",
                   help=f"{listing}. `ddetr bench SUBCOMMAND --help` shows its options; options without a "
                        "subcommand go to `op` (e.g. `ddetr bench --quick`)")


def run(args: argparse.Namespace) -> int:
    argv = list(args.bench_args)
    if argv and argv[0] in SUBCOMMANDS:
        name = argv.pop(0)
    elif argv and not argv[0].startswith("-"):
        raise ValueError(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    else:
        name = "op"  # `ddetr bench --quick ...` before subcommands existed
    module = importlib.import_module(f"ddetr.bench.{SUBCOMMANDS[name][0]}")
    return int(module.main(argv) or 0)
