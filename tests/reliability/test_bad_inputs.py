"""Bad input through the CLI, table-driven: every case ends with one stderr line naming the culprit (an error, exit
status 2; or a warning by design, exit status 0), no traceback, no advice to load unsafely, and nothing saved changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import fingerprint, train_args


@dataclass
class Case:
    id: str
    argv: Callable[[SimpleNamespace], list]  # env -> the command line (making the case's own files in env.tmp)
    culprit: Callable[[SimpleNamespace], object]  # env -> what the one line must name
    code: int = 2
    warning: bool = False  # by design: exit status 0 and one WARNING line
    started: bool = False  # failed once training had started: a new run folder may hold its config and events


def copy_data(env: SimpleNamespace, edit: Callable[[dict], None] | None = None,
              files: Callable[[Path], None] | None = None) -> Path:
    """A copy of the dataset whose train split's annotations (``edit``) or image folder (``files``) is damaged."""
    root = env.tmp / "d"
    shutil.copytree(env.data, root)
    if edit is not None:
        ann = root / "train" / "annotations.json"
        data = json.loads(ann.read_text())
        edit(data)
        ann.write_text(json.dumps(data))
    if files is not None:
        files(root / "train" / "images")
    return root


def train_on(edit=None, files=None) -> Callable[[SimpleNamespace], list]:
    return lambda env: train_args(copy_data(env, edit, files), env.tmp / "out")


def eval_on(edit=None) -> Callable[[SimpleNamespace], list]:
    def argv(env):
        root = copy_data(env)
        if edit is not None:
            ann = root / "val" / "annotations.json"
            data = json.loads(ann.read_text())
            edit(data)
            ann.write_text(json.dumps(data))
        return ["eval", "--checkpoint", env.run / "best.pth", "--data", root / "val"]
    return argv


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def train_opts(*extra) -> Callable[[SimpleNamespace], list]:
    """The tiny train command plus ``extra`` options (callables of env give paths)."""
    return lambda env: train_args(env.data, env.tmp / "out", *[x(env) if callable(x) else x for x in extra])


ANNOTATIONS = lambda env: "annotations.json"  # noqa: E731
FIRST_IMAGE = lambda env: "000000.jpg"  # noqa: E731


def _set(key: str, value):
    def edit(data: dict) -> None:
        section, index, field = key.split(".")
        data[section][int(index)][field] = value
    return edit


CASES = [
    # ---- options ------------------------------------------------------------------------------------------------
    Case("epochs-negative", train_opts("--epochs", "-5"), lambda e: "--epochs"),
    Case("epochs-not-a-number", train_opts("--epochs", "many"), lambda e: "--epochs"),
    Case("batch-size-zero", train_opts("--batch-size", "0"), lambda e: "--batch-size"),
    Case("time-budget-negative", train_opts("--time-budget", "-5"), lambda e: "--time-budget"),
    Case("time-budget-nan", train_opts("--time-budget", "nan"), lambda e: "--time-budget"),
    Case("amp-unknown", train_opts("--amp", "fp8"), lambda e: "--amp"),
    Case("amp-fp16-on-cpu", train_opts("--amp", "fp16"), lambda e: "--amp fp16"),
    Case("device-unknown", train_opts("--device", "tpu"), lambda e: "--device"),
    Case("device-gpu-absent", train_opts("--device", "cuda:99"), lambda e: "--device cuda:99"),
    Case("set-lr-text", train_opts("--set", "optim.lr=abc"), lambda e: "optim.lr"),
    Case("set-lr-negative", train_opts("--set", "optim.lr=-1"), lambda e: "lr must be"),
    Case("set-epochs-fraction", train_opts("--set", "epochs=2.5"), lambda e: "epochs"),
    Case("set-unknown-key", train_opts("--set", "optim.speed=3"), lambda e: "speed"),
    Case("set-without-value", train_opts("--set", "optim.lr"), lambda e: "--set"),
    Case("set-scales-not-ints", train_opts("--set", "data.scales=[64, big]"), lambda e: "data.scales"),
    Case("set-bool-wrong", train_opts("--set", "data.crop=maybe"), lambda e: "data.crop"),
    Case("set-hidden-dim-invalid", train_opts("--set", "detector.model.hidden_dim=40"), lambda e: "hidden_dim"),
    Case("set-device-invalid", train_opts("--set", "device=gpu0"), lambda e: "device"),
    Case("config-missing", lambda e: ["train", "--config", e.tmp / "nope.yaml"], lambda e: "nope.yaml"),
    Case("config-malformed", lambda e: ["train", "--config", write(e.tmp / "c.yaml", "epochs: [1,\n")],
         lambda e: "c.yaml"),
    Case("config-wrong-type", lambda e: ["train", "--config", write(e.tmp / "c.yaml", "optim:\n  lr: fast\n")],
         lambda e: "optim.lr"),
    Case("match-names-alone", train_opts("--match-class-names"), lambda e: "--match-class-names"),
    Case("eval-without-data", lambda e: ["eval", "--checkpoint", e.run / "best.pth"], lambda e: "--data"),
    Case("eval-batch-size-zero", lambda e: ["eval", "--checkpoint", e.run / "best.pth", "--data", e.data / "val",
                                            "--batch-size", "0"], lambda e: "--batch-size"),
    Case("eval-device-gpu-absent", lambda e: ["eval", "--checkpoint", e.run / "best.pth", "--data", e.data / "val",
                                              "--device", "cuda:99"], lambda e: "--device cuda:99"),
    Case("predict-threshold-out-of-range", lambda e: ["predict", "--checkpoint", e.run / "best.pth", e.image,
                                                      "--threshold", "1.5", "--out", e.tmp / "p"],
         lambda e: "--threshold"),
    # ---- annotations and images ---------------------------------------------------------------------------------
    Case("data-folder-missing", lambda e: train_args(e.tmp / "nowhere", e.tmp / "out"), lambda e: "nowhere"),
    Case("annotations-missing", train_on(files=lambda d: (d.parent / "annotations.json").unlink()), ANNOTATIONS),
    Case("images-folder-missing", train_on(files=shutil.rmtree), lambda e: "images"),
    Case("annotations-malformed-json", train_on(files=lambda d: write(d.parent / "annotations.json", '{"images": [')),
         ANNOTATIONS),
    Case("annotations-not-an-object", train_on(files=lambda d: write(d.parent / "annotations.json", "[1, 2]")),
         ANNOTATIONS),
    Case("annotations-not-utf8", train_on(files=lambda d: write(d.parent / "annotations.json", b"\xff\xfe{")),
         ANNOTATIONS),
    Case("images-not-a-list", train_on(lambda data: data.update(images={"a": 1})), ANNOTATIONS),
    Case("image-id-text", train_on(_set("images.0.id", "one")), ANNOTATIONS),
    Case("image-width-negative", train_on(_set("images.0.width", -64)), ANNOTATIONS),
    Case("image-size-mismatch", train_on(_set("images.0.width", 100)), FIRST_IMAGE),
    Case("annotation-unknown-image", train_on(_set("annotations.0.image_id", 999)), ANNOTATIONS),
    Case("annotation-unknown-category", train_on(_set("annotations.0.category_id", 4)), ANNOTATIONS),
    Case("annotation-bbox-text", train_on(_set("annotations.0.bbox", "10 10 5 5")), ANNOTATIONS),
    Case("annotation-bbox-negative", train_on(_set("annotations.0.bbox", [1, 1, -5, 5])), ANNOTATIONS),
    Case("annotation-iscrowd-2", train_on(_set("annotations.0.iscrowd", 2)), ANNOTATIONS),
    Case("category-id-null", train_on(_set("categories.0.id", None)), ANNOTATIONS),
    Case("image-is-text", train_on(files=lambda d: write(d / "000000.jpg", "not an image")), FIRST_IMAGE),
    Case("image-missing", train_on(files=lambda d: (d / "000000.jpg").unlink()), FIRST_IMAGE),
    Case("image-truncated", train_on(files=lambda d: write(d / "000000.jpg", (d / "000000.jpg").read_bytes()[:400])),
         FIRST_IMAGE),
    Case("image-pixels-truncated", train_on(files=lambda d: write(d / "000001.jpg", (d / "000001.jpg").read_bytes()[
        :len((d / "000001.jpg").read_bytes()) * 2 // 3])), lambda e: "000001.jpg", started=True),
    Case("eval-box-partly-outside", eval_on(_set("annotations.0.bbox", [50, 50, 40, 40])), ANNOTATIONS, code=0,
         warning=True),
    Case("eval-box-zero-size", eval_on(_set("annotations.0.bbox", [10, 10, 0, 5])), ANNOTATIONS, code=0,
         warning=True),
    # ---- checkpoints --------------------------------------------------------------------------------------------
    Case("resume-missing", lambda e: ["train", "--resume", e.tmp / "last.pth"], lambda e: "last.pth"),
    Case("resume-text", lambda e: ["train", "--resume", e.bad.text], lambda e: e.bad.text),
    Case("resume-truncated", lambda e: ["train", "--resume", e.bad.truncated], lambda e: e.bad.truncated),
    Case("resume-corrupt", lambda e: ["train", "--resume", e.bad.corrupt], lambda e: e.bad.corrupt),
    Case("resume-pickle-with-code", lambda e: ["train", "--resume", e.bad.evil], lambda e: "Python objects"),
    Case("resume-weights-only", lambda e: ["train", "--resume", e.bad.weights_only], lambda e: "weights only"),
    Case("resume-wrong-shape", lambda e: ["train", "--resume", e.bad.wrong_shape], lambda e: e.bad.wrong_shape_key),
    Case("resume-changed-option", lambda e: ["train", "--resume", e.run / "last.pth", "--set", "optim.lr=1e-2"],
         lambda e: "optim.lr: saved"),
    Case("resume-other-output", lambda e: ["train", "--resume", e.run / "last.pth", "--output", e.tmp / "o"],
         lambda e: "--output"),
    Case("resume-and-overwrite", lambda e: ["train", "--resume", e.run / "last.pth", "--overwrite"],
         lambda e: "--overwrite"),
    Case("run-folder-taken", lambda e: train_args(e.data, e.run), lambda e: "already holds a run"),
    Case("pretrained-text", train_opts("--pretrained", lambda e: e.bad.text), lambda e: e.bad.text),
    Case("pretrained-pickle-with-code", train_opts("--pretrained", lambda e: e.bad.evil), lambda e: "Python objects"),
    Case("pretrained-truncated", train_opts("--pretrained", lambda e: e.bad.truncated), lambda e: e.bad.truncated),
    Case("eval-corrupt", lambda e: ["eval", "--checkpoint", e.bad.corrupt, "--data", e.data / "val"],
         lambda e: e.bad.corrupt),
    Case("eval-empty", lambda e: ["eval", "--checkpoint", e.bad.empty, "--data", e.data / "val"],
         lambda e: e.bad.empty),
    Case("eval-json-file", lambda e: ["eval", "--checkpoint", e.bad.json, "--data", e.data / "val"],
         lambda e: e.bad.json),
    Case("eval-numpy-pickle", lambda e: ["eval", "--checkpoint", e.bad.numpy, "--data", e.data / "val"],
         lambda e: "Python objects"),
    Case("eval-wrong-variant", lambda e: ["eval", "--checkpoint", e.bad.wrong_variant, "--data", e.data / "val"],
         lambda e: e.bad.wrong_variant),
    Case("eval-hf-folder-bad-bin", lambda e: ["eval", "--checkpoint", e.bad.hf_bad_bin, "--data", e.data / "val"],
         lambda e: "pytorch_model.bin"),
    Case("eval-hf-folder-bad-config", lambda e: ["eval", "--checkpoint", e.bad.hf_bad_config, "--data",
                                                 e.data / "val"], lambda e: "config.json"),
    Case("eval-folder-not-a-model", lambda e: ["eval", "--checkpoint", e.bad.no_config, "--data", e.data / "val"],
         lambda e: e.bad.no_config),
    Case("predict-truncated", lambda e: ["predict", "--checkpoint", e.bad.truncated, e.image, "--out", e.tmp / "p"],
         lambda e: e.bad.truncated),
    Case("predict-pickle-with-code", lambda e: ["predict", "--checkpoint", e.bad.evil, e.image, "--out", e.tmp / "p"],
         lambda e: "Python objects"),
    Case("predict-corrupt-safetensors", lambda e: ["predict", "--checkpoint", e.bad.safetensors, e.image, "--out",
                                                   e.tmp / "p"], lambda e: e.bad.safetensors),
    Case("export-text", lambda e: ["export", "--checkpoint", e.bad.text, "--out", e.tmp / "m.onnx"],
         lambda e: e.bad.text),
    Case("export-wrong-variant", lambda e: ["export", "--checkpoint", e.bad.wrong_variant, "--out", e.tmp / "m.onnx"],
         lambda e: e.bad.wrong_variant),
    Case("convert-pickle-with-code", lambda e: ["convert", e.bad.evil, e.tmp / "c.pth"], lambda e: "Python objects"),
    Case("convert-corrupt-safetensors", lambda e: ["convert", e.bad.safetensors, e.tmp / "c.pth"],
         lambda e: e.bad.safetensors),
    Case("convert-hf-folder-bad-bin", lambda e: ["convert", e.bad.hf_bad_bin, e.tmp / "c.pth"],
         lambda e: "pytorch_model.bin"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, run_cli, dataset, trained, bad, tmp_path):
    image = next((dataset / "val" / "images").iterdir())
    env = SimpleNamespace(data=dataset, run=trained, bad=bad, tmp=tmp_path, image=image)
    argv = case.argv(env)
    before = fingerprint(dataset, trained, bad.root, tmp_path)
    result = run_cli(*argv)
    assert result.code == case.code, result.err[-3000:]
    assert len(result.lines) == 1, result.err[-3000:]
    line = result.lines[0]
    assert line.startswith("WARNING " if case.warning else f"ddetr {argv[0]}: error: "), line
    assert str(case.culprit(env)) in line, line
    assert "Traceback" not in result.err and "weights_only" not in result.err
    assert "this-should-never-run" not in result.out
    after = fingerprint(dataset, trained, bad.root, tmp_path)
    if case.started:  # nothing changed but the new run folder, which holds no checkpoint and no log line
        new = {Path(p) for p in set(after) - set(before)}
        assert all(p.is_relative_to(tmp_path / "out") and p.suffix not in (".pth", ".jsonl") for p in new), new
        after = {p: h for p, h in after.items() if p in before}
    assert after == before


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_images_skipped_during_training_are_summarised(run_cli, dataset, tmp_path):
    def truncate(images: Path) -> None:
        data = (images / "000001.jpg").read_bytes()
        write(images / "000001.jpg", data[: len(data) * 2 // 3])

    env = SimpleNamespace(data=dataset, tmp=tmp_path)
    result = run_cli(*train_args(copy_data(env, files=truncate), tmp_path / "out", "--epochs", "2", "--skip-bad"))
    assert result.code == 0, result.err[-3000:]
    assert len(result.lines) == 1 and "000001.jpg" in result.lines[0], result.lines  # the one warning, once
    summaries = [line for line in result.out.splitlines() if line.startswith("train data: ")]
    assert summaries and all(line.endswith("skipped 1 undecodable images") for line in summaries), result.out
