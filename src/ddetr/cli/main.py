"""`ddetr train | eval | predict | export | convert | visualize | bench | data synth | demo`."""

from __future__ import annotations

import argparse
import logging
import sys

from ddetr.cli import commands

DESCRIPTION = "Deformable DETR: train, evaluate, predict, export, convert and inspect detectors."


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddetr", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, setup, run) -> None:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        setup(p)
        p.set_defaults(run=run)

    add("train", "Train a detector on a COCO-format dataset.", commands.add_train_args, commands.run_train)
    add("eval", "Evaluate a checkpoint with COCO AP on a COCO-format dataset.", commands.add_eval_args,
        commands.run_eval)
    add("predict", "Detect objects in images; write JSON results and drawn images.", commands.add_predict_args,
        commands.run_predict)
    add("export", "Export a checkpoint to ONNX.", commands.add_export_args, commands.run_export)
    add("convert", "Convert weights between ddetr, official and Hugging Face formats.", commands.add_convert_args,
        commands.run_convert)
    add("visualize", "Draw detections and the sampling points / attention of queries.", commands.add_visualize_args,
        commands.run_visualize)
    add("bench", "Time the deformable attention backends side by side.", commands.add_bench_args, commands.run_bench)
    add("demo", "The main job: synthetic data -> train the demo preset on CPU -> evaluate -> draw predictions.",
        commands.add_demo_args, commands.run_demo)
    data = sub.add_parser("data", help="Dataset tools.", formatter_class=_Formatter)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_sub.add_parser("synth", help="Write the built-in synthetic dataset (COCO JSON + images).",
                                formatter_class=_Formatter)
    commands.add_synth_args(synth)
    synth.set_defaults(run=commands.run_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, tok in enumerate(argv) if not tok.startswith("-")), None)
    passthrough: list[str] = []
    if command is not None and argv[command] == "bench" and "-h" not in argv[command + 1:][:1]:
        argv, passthrough = argv[:command + 1], argv[command + 1:]  # the rest belongs to the benchmark script
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.bench_args = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        if args.verbose:
            raise
        print(f"ddetr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
