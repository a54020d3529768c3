"""Checkpoints: atomic writes, safe reading (tensors only, one-line errors), and the RNG states of exact resumption.

Every reader here refuses, on one line naming the file, anything it cannot load: a missing, empty, corrupt or
truncated file, another kind of file, or a pickle holding Python objects other than tensors (which is never loaded,
and never with advice to turn the safety off).
"""

from __future__ import annotations

import os
import random
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddetr.engine.faults import kill_point

FORMAT = "ddetr"
VERSION = 1
UNSAFE = "so it is not loaded (only weights are loaded, for safety)"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"


def ignore_file_size_signal() -> None:
    """Past a file-size limit (ulimit -f) the kernel kills with SIGXFSZ; ignored, the write raises OSError instead."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a failure or a crash never leaves half
    a file in ``path`` (the previous one stays); a failure removes the temporary file and raises a one-line OSError."""
    path = Path(path)
    ignore_file_size_signal()
    tmp = writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(obj, writer)
            f.flush()
            kill_point("checkpoint-write")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # disk full, file-size limit, permissions, Ctrl-C: no temporary file stays behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        kept = " (the previous one is unchanged)" if path.is_file() else ""
        cause = writer.error if writer is not None and writer.error is not None else exc
        raise OSError(f"{path}: could not write the checkpoint{kept}: {_reason(cause)}") from exc


class _Writer:
    """A file that remembers the first OSError of ``write``: torch.save reports it only as a bad zip position."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a small text file (log, config) in one step, so a crash leaves the old or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: could not write it: {_reason(exc)}") from exc


def remove_temp_files(folder: str | Path) -> None:
    """Delete the temporary files of writes that a crash (e.g. SIGKILL) interrupted: ``.NAME.pth.*``, ``.NAME.tmp``."""
    for pattern in (".*.pth.*", ".*.tmp"):
        for leftover in Path(folder).glob(pattern):
            leftover.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """The first line of an error, without the exception's own guidance (torch's is long and sometimes unsafe)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
    if cause is not None and cause.strerror:
        return cause.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text.split(". ")[0][:160]


def _torch_load_problem(exc: BaseException, zipped: bool) -> str:
    """Why torch.load failed, in words for the user; never repeats torch's advice to disable weights_only."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return f"it contains Python objects other than tensors ({found.group(1)}), {UNSAFE}"
    if zipped:
        return "the file is corrupt or truncated (its zip archive cannot be read)"
    return "not a PyTorch checkpoint (an unreadable, corrupt or other kind of file)"


def load_torch(path: str | Path, allowed: Sequence[type] = (), mmap: bool = False) -> Any:
    """torch.load with weights_only (tensors, plain containers and the ``allowed`` classes): no code runs.

    ``mmap`` maps a zip-format file instead of reading it (fast when only its small entries are needed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a checkpoint file (a folder)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the checkpoint ({_reason(exc)})") from None
    if not head:
        raise ValueError(f"{path}: the checkpoint file is empty")
    zipped = head == _ZIP_MAGIC
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except Exception as exc:  # noqa: BLE001 - any failure is reported on one line
        raise ValueError(f"{path}: {_torch_load_problem(exc, zipped)}") from None


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A ddetr checkpoint dictionary (``last.pth``/``best.pth``), safely; one-line errors for anything else."""
    ckpt = load_torch(path, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dictionary (got {type(ckpt).__name__})")
    return ckpt


def check_ddetr_layout(ckpt: dict[str, Any], path: str | Path) -> None:
    """A dictionary saying ``"format": "ddetr"`` must hold what our readers use: one line naming what is wrong."""
    if ckpt.get("format") != FORMAT:
        return
    from ddetr.models.config import DetectorConfig

    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: ddetr checkpoint version {ckpt.get('version')!r} is not supported ({VERSION})")
    model = ckpt.get("model")
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise ValueError(f"{path}: damaged ddetr checkpoint ('model' is not a dictionary of named tensors)")
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: damaged ddetr checkpoint (no 'config' dictionary)")
    try:
        DetectorConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: damaged ddetr checkpoint (its config: {exc})") from None
    for key in ("class_names", "category_ids"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], (list, tuple)):
            raise ValueError(f"{path}: damaged ddetr checkpoint ({key!r} is not a list)")


def _safetensors_problem(exc: BaseException) -> str:
    text = _reason(exc)
    return f"not a readable safetensors file, corrupt or truncated ({text})"


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (empty when it has none); one-line error when unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: one line
        raise ValueError(f"{path}: {_safetensors_problem(exc)}") from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (no code can run: the format holds tensors only); one-line errors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: one line
        raise ValueError(f"{path}: {_safetensors_problem(exc)}") from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # fewer GPUs now: the rest unused
