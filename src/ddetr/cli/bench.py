"""`ddetr bench`: the operator benchmark (benchmarks/ms_deform_attn.py) from the installed package."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "ms_deform_attn.py"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench_args", nargs="*", metavar="OPTION",
                   help="options passed on to benchmarks/ms_deform_attn.py (e.g. --quick, --scaling, --device cuda; "
                        "`ddetr bench --help` shows this, `ddetr bench --quick --help` the script's own)")


def run(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT}: benchmark script not found (run from a source checkout)")
    sys.argv = [str(SCRIPT), *args.bench_args]
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return 0
