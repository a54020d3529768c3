"""The `ddetr` CLI end to end on a tiny synthetic dataset, its --help texts, and its one-line errors.

Commands run in this process (`run_cli`): the same `main(argv)` as the console script, without a child process and
its second torch import; `python -m ddetr` itself is checked once in a child process."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ddetr_subprocess, fresh_log_handler

from ddetr.cli.main import build_parser
from ddetr.cli.main import main as cli_main
from ddetr.data.synthetic import generate

COMMANDS = ["train", "eval", "predict", "export", "convert", "visualize", "bench", "demo"]
_TINY_SETTINGS = [
    "detector.model.backbone=resnet18", "detector.model.hidden_dim=32", "detector.model.nheads=4",
    "detector.model.enc_layers=1", "detector.model.dec_layers=2", "detector.model.dim_feedforward=64",
    "detector.model.num_queries=10", "detector.model.num_feature_levels=1", "detector.model.frozen_batchnorm=false",
    "detector.model.train_backbone=false", "data.scales=[64]", "data.max_size=64", "data.crop=false",
    "data.val_size=64", "data.num_workers=0", "optim.lr_drop=10",
]
TINY = [arg for setting in _TINY_SETTINGS for arg in ("--set", setting)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest not in ("help",) and action.option_strings:
            assert action.help, f"ddetr {command} {action.option_strings} has no help text"
    assert sub.format_help()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    out = io.StringIO()
    fresh_log_handler()
    with contextlib.redirect_stdout(out):
        assert cli_main(["data", "synth", "--out", str(root / "data"), "--num-train", "6", "--num-val", "3",
                         "--image-size", "64", "--min-objects", "1", "--max-objects", "2"]) == 0
        assert cli_main(["train", "--preset", "demo", "--data", str(root / "data" / "train"), "--val-data",
                         str(root / "data" / "val"), "--epochs", "1", "--batch-size", "3", "--output",
                         str(root / "run"), *TINY]) == 0
    assert "train: 6 images" in out.getvalue() and "AP50" in out.getvalue()
    return root, root / "run" / "last.pth"


def test_eval_predict_convert_export_visualize(trained, run_cli):
    root, ckpt = trained
    r = run_cli("eval", "--checkpoint", ckpt, "--data", root / "data" / "val", "--out", root / "eval")
    assert r.code == 0, r.err[-3000:]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)

    images = root / "data" / "val" / "images"
    r = run_cli("predict", "--checkpoint", ckpt, images, "--threshold", "0", "--out", root / "pred")
    assert r.code == 0, r.err[-3000:]
    results = json.loads((root / "pred" / "results.json").read_text())
    assert len(results) == 3 and all(rec["detections"] for rec in results)
    assert len(list((root / "pred").glob("*_pred.png"))) == 3
    coco = json.loads((root / "pred" / "coco_results.json").read_text())
    assert coco and {"file_name", "category_id", "bbox", "score"} <= set(coco[0])  # no --annotations: no image ids

    r = run_cli("convert", ckpt, root / "hf", "--to", "hf")
    assert r.code == 0, r.err[-3000:]
    assert (root / "hf" / "config.json").is_file()

    r = run_cli("export", "--checkpoint", ckpt, "--out", root / "m.onnx", "--size", "64", "64")
    assert r.code == 0, r.err[-3000:]
    r = run_cli("predict", "--onnx", root / "m.onnx", images, "--threshold", "0", "--out", root / "pred_onnx",
                "--size", "64")
    assert r.code == 0, r.err[-3000:]
    onnx_results = json.loads((root / "pred_onnx" / "results.json").read_text())
    first, second = results[0]["detections"][0], onnx_results[0]["detections"][0]
    assert first["category_id"] == second["category_id"] and abs(first["score"] - second["score"]) < 1e-3

    r = run_cli("visualize", "--checkpoint", ckpt, next(images.iterdir()), "--top", "1", "--out", root / "viz")
    assert r.code == 0, r.err[-3000:]
    assert len(list((root / "viz").glob("*.png"))) >= 2


@pytest.mark.parametrize("problem", ["missing", "corrupt_json", "bad_image"])
def test_bad_input_gives_one_line_error(tmp_path, problem, run_cli):
    generate(tmp_path / "d", num_train=2, num_val=0, image_size=32, min_objects=1, max_objects=1)
    train = tmp_path / "d" / "train"
    if problem == "missing":
        args = ["eval", "--checkpoint", str(tmp_path / "nope.pth"), "--data", str(train)]
    elif problem == "corrupt_json":
        (train / "annotations.json").write_text('{"images": [')
        args = ["train", "--preset", "demo", "--data", str(train), "--epochs", "1", "--output", str(tmp_path / "r")]
    else:
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        args = ["predict", "--checkpoint", str(tmp_path / "nope.pth"), str(bad)]
    r = run_cli(*args)
    assert r.code == 2
    lines = [line for line in r.err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert str(tmp_path) in lines[0]


def test_python_m_ddetr_is_the_same_tool():
    r = ddetr_subprocess("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_bench_passes_its_options_to_the_packaged_benchmark(tmp_path, monkeypatch, run_cli):
    # From another directory: the benchmark comes from the package, not from a source checkout's benchmarks/.
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        r = run_cli("bench", "op", "--quick", "--no-memory", "--batch", "1", "--repeats", "5", "--impls",
                    "reference", "hf", "--threads", "1")
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's thread count
    assert r.code == 0, r.err[-3000:]
    rows = [line for line in r.out.splitlines() if line.startswith("| encoder | 1 |")]
    assert {row.split("|")[3].strip() for row in rows} == {"reference", "hf"}


@pytest.mark.parametrize(("subcommand", "option"), [(["op"], "--scaling"), (["model"], "--presets"),
                                                     (["paper-claims"], "--budget"), (["contention"], "--steps"),
                                                     ([], "--scaling")])
def test_bench_subcommands_show_their_own_options(subcommand, option, capsys):
    # No subcommand means `op`, as before subcommands existed (`ddetr bench --quick`).
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", *subcommand, "--quick", "--help"])
    assert exit_.value.code == 0 and option in capsys.readouterr().out


def test_bench_refuses_an_unknown_subcommand(capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "op, model, paper-claims, contention" in capsys.readouterr().err


def test_set_and_config_values_are_converted_to_the_field_types(tmp_path):
    from ddetr.cli.train import load_train_config

    args = build_parser().parse_args(["train", "--set", "optim.lr=2e-4", "--set", "epochs=1e1", "--set",
                                      "data.scales=[64, 96]", "--set", "data.crop=off", "--set", "time_budget=null",
                                      "--set", "output_dir=2024"])
    cfg = load_train_config(args)
    assert (cfg.optim.lr, cfg.epochs, cfg.data.scales, cfg.data.crop, cfg.time_budget, cfg.output_dir) == (
        2e-4, 10, (64, 96), False, None, "2024")
    assert type(cfg.optim.lr) is float and type(cfg.epochs) is int
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-4\ntime_budget: 1e3\ndata:\n  crop_size: [64, 96]\n")  # YAML 1.1: text
    cfg = load_train_config(build_parser().parse_args(["train", "--config", str(path)]))
    assert (cfg.optim.lr, cfg.time_budget, cfg.data.crop_size) == (2e-4, 1000.0, (64, 96))


@pytest.mark.parametrize(("argv", "culprit"), [
    (["train", "--set", "optim.lr=abc"], "--set optim.lr: expected a number, got 'abc'"),
    (["train", "--time-budget", "-5"], "argument --time-budget: expected a number > 0, got '-5'"),
    (["eval", "--checkpoint", "x.pth"], "give --data DIR, or both --images and --annotations"),
    (["train", "--device", "cuda:99"], "--device cuda:99: "),
])
def test_bad_options_give_one_line(argv, culprit, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and culprit in err, err


def test_resume_alone_continues_and_overwrite_starts_over(trained, tmp_path):
    root, ckpt = trained
    run = Path(shutil.copytree(ckpt.parent, tmp_path / "run"))
    assert cli_main(["train", "--resume", str(run / "last.pth"), "--epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    again = ["train", "--preset", "demo", "--data", str(root / "data" / "train"), "--epochs", "1", "--batch-size",
             "3", "--output", str(run), *TINY]
    assert cli_main(again) == 2  # the folder holds a run
    assert cli_main([*again, "--overwrite"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "best.pth").exists()  # no validation data in the new run: the old run's best is gone too
