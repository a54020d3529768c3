"""`ddetr train | eval | predict | export | convert | visualize | bench | data synth | demo`."""

from __future__ import annotations

import argparse
import logging
import sys

from ddetr.cli import bench, convert, data, demo, export, predict, train, visualize
from ddetr.cli import eval as eval_
from ddetr.engine.threads import set_openmp_defaults

DESCRIPTION = "Deformable DETR: train, evaluate, predict, export, convert and inspect detectors."
# name -> (module with add_args/run, one-line help). Command modules import torch only inside `run`.
COMMANDS = {
    "train": (train, "Train a detector on a COCO-format dataset."),
    "eval": (eval_, "Evaluate a checkpoint with COCO AP on a COCO-format dataset."),
    "predict": (predict, "Detect objects in images; write JSON results and drawn images."),
    "export": (export, "Export a checkpoint to ONNX."),
    "convert": (convert, "Convert weights between ddetr, official and Hugging Face formats."),
    "visualize": (visualize, "Draw detections and the sampling points / attention of queries."),
    "bench": (bench, "Benchmarks side by side with their references: op, model, paper-claims, contention, predict."),
    "demo": (demo, "The main job: synthetic data -> train the demo preset on CPU -> evaluate -> draw predictions."),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class LogHandler(logging.Handler):
    """``LEVEL message`` lines on stderr, written around any progress bar (tqdm.write) instead of through it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: a log line must never stop the program
            self.handleError(record)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (the option, the allowed values and where help is), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddetr", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        module.add_args(p)
        p.set_defaults(run=module.run)
    tools = sub.add_parser("data", help="Dataset tools.", formatter_class=_Formatter)
    tools_sub = tools.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = tools_sub.add_parser("synth", help=data.__doc__.split(": ", 1)[1], formatter_class=_Formatter)
    data.add_args(synth)
    synth.set_defaults(run=data.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_openmp_defaults()  # before any command imports torch: libgomp reads it once, when loaded
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, tok in enumerate(argv) if not tok.startswith("-")), None)
    passthrough: list[str] = []
    if command is not None and argv[command] == "bench" and "-h" not in argv[command + 1:][:1]:
        argv, passthrough = argv[:command + 1], argv[command + 1:]  # the rest belongs to the benchmark script
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.bench_args = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[LogHandler()])
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as exc:  # bad input, files, disk, a diverged run: one line
        if args.verbose:
            raise
        print(f"ddetr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
