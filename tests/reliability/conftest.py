"""Shared fixtures of the reliability suite (`run_cli` is in tests/conftest.py): a tiny dataset and a tiny trained run
made once per session, damaged checkpoints of every kind, and folder fingerprints proving nothing saved changed."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CliResult, fresh_log_handler
from conftest import ddetr_subprocess as run_subprocess

from ddetr.cli.main import main
from ddetr.data.synthetic import generate

_TINY_SETTINGS = [
    "detector.model.backbone=resnet18", "detector.model.hidden_dim=32", "detector.model.nheads=4",
    "detector.model.enc_layers=1", "detector.model.dec_layers=2", "detector.model.dim_feedforward=64",
    "detector.model.num_queries=10", "detector.model.num_feature_levels=1", "detector.model.train_backbone=false",
    "data.scales=[64]", "data.max_size=64", "data.crop=false", "data.val_size=64", "data.num_workers=0",
    "optim.lr_drop=10",
]
TINY = [arg for setting in _TINY_SETTINGS for arg in ("--set", setting)]


def train_args(data: Path, output: Path, *extra: str) -> list[str]:
    """A tiny from-scratch `ddetr train` command on the CPU (one epoch unless ``extra`` says otherwise)."""
    return ["train", "--preset", "demo", "--data", str(data / "train"), "--val-data", str(data / "val"),
            "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--amp", "none", "--output", str(output),
            *TINY, *extra]


def fingerprint(*folders: Path) -> dict[str, str]:
    """Path -> hash of every file under ``folders``: of the content up to 1 MiB; beyond, of the size, the change time,
    the inode (an atomic replace changes it) and the first and last 64 KiB (missing folders count as empty)."""
    prints = {}
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            stat = path.stat()
            digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                if stat.st_size <= 1 << 20:
                    digest.update(f.read())
                else:
                    digest.update(f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ino}".encode() + f.read(1 << 16))
                    f.seek(-(1 << 16), os.SEEK_END)
                    digest.update(f.read())
            prints[str(path)] = digest.hexdigest()
    return prints


def ddetr_subprocess(*argv: str | Path, limit_file_size: int | None = None, without_dac_override: bool = False,
                     **kw) -> subprocess.CompletedProcess:
    """The shared ``ddetr_subprocess`` (a child process, one thread), with faults that need a process of their own:
    a file-size limit, no permission override for root."""
    def limits() -> None:
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
        if without_dac_override and os.geteuid() == 0:  # root ignores file modes unless it drops this capability
            libc = ctypes.CDLL(None, use_errno=True)
            pr_capbset_drop, cap_dac_override = 24, 1
            if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return run_subprocess(*argv, preexec_fn=limits, **kw)


def stderr_lines(err: str) -> list[str]:
    return CliResult(0, "", err).lines


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A synthetic COCO dataset: train/ (4 images) and val/ (2 images), 64x64 pixels."""
    root = tmp_path_factory.mktemp("data")
    generate(root, num_train=4, num_val=2, image_size=64, seed=0, min_objects=1, max_objects=2)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, dataset) -> Path:
    """The folder of a tiny one-epoch run: last.pth, best.pth, metrics.jsonl, config.yaml, curves."""
    run = tmp_path_factory.mktemp("trained") / "run"
    fresh_log_handler()
    assert main(train_args(dataset, run)) == 0
    assert (run / "last.pth").is_file() and (run / "best.pth").is_file()
    return run


class Evil:
    """Unpickling this runs code: the kind of file that must never be loaded."""

    def __reduce__(self):
        return (os.system, ("echo this-should-never-run",))


@pytest.fixture(scope="session")
def bad(tmp_path_factory, trained) -> SimpleNamespace:
    """Damaged checkpoints of every kind, each named after what is wrong with it."""
    root = tmp_path_factory.mktemp("bad")
    best = (trained / "best.pth").read_bytes()
    files = SimpleNamespace(root=root)

    def put(name: str, data: bytes | str) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    files.empty = put("empty.pth", b"")
    files.text = put("text.pth", "model weights were here\n")
    files.json = put("json.pth", json.dumps({"model": {}}))
    files.truncated = put("truncated.pth", best[: len(best) // 2])
    files.corrupt = put("corrupt.pth", best[:30] + bytes(4096) + best[4126:-2048] + bytes(2048))
    evil = root / "evil.pth"
    torch.save({"model": Evil()}, evil)
    files.evil = evil
    files.numpy = root / "numpy.pth"
    import numpy as np

    torch.save({"model": {"w": np.zeros(3)}}, files.numpy)
    ckpt = torch.load(trained / "best.pth", weights_only=True)
    variant = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "with_box_refine": True,
                                                                "two_stage": True}}}
    files.wrong_variant = root / "wrong_variant.pth"
    torch.save(variant, files.wrong_variant)
    last = torch.load(trained / "last.pth", weights_only=True)
    key = next(k for k in last["model"] if k.startswith("class_embed") and k.endswith("weight"))
    last["model"][key] = torch.zeros(3, 5)
    files.wrong_shape_key = key
    files.wrong_shape = root / "wrong_shape" / "last.pth"
    files.wrong_shape.parent.mkdir()
    torch.save(last, files.wrong_shape)
    files.weights_only = root / "best_only" / "best.pth"
    files.weights_only.parent.mkdir()
    shutil.copy(trained / "best.pth", files.weights_only)
    files.safetensors = put("corrupt.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}" + bytes(64))
    files.hf_bad_bin = root / "hf_bad_bin"
    put("hf_bad_bin/config.json", json.dumps({"model_type": "deformable_detr"}))
    put("hf_bad_bin/pytorch_model.bin", "not a pickle")
    files.hf_bad_config = root / "hf_bad_config"
    put("hf_bad_config/config.json", "{ not json")
    put("hf_bad_config/model.safetensors", b"")
    files.no_config = root / "no_config"
    files.no_config.mkdir()
    return files
