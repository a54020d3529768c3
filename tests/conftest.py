"""Shared fixtures: the (device, backend) pairs the op tests run on, a random-input factory for the op, models moved
off their init (`perturb_`), the CLI run in-process (`run_cli`) or in a child process (`ddetr_subprocess`), and one
intra-op thread for bit-exact comparisons with child processes (`one_thread`)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import ddetr.ops
from ddetr.cli.main import LogHandler, main

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one intra-op thread per worker process, not two each
    torch.set_num_threads(1)


def backend_cases() -> list[tuple[str, str]]:
    """Every backend available for CPU tensors at collection time, plus the CUDA ones when a GPU exists."""
    cases = [("cpu", name) for name in ddetr.ops.available_backends(torch.empty(0))]
    if torch.cuda.is_available():
        cases += [("cuda", name) for name in ddetr.ops.available_backends(torch.empty(0, device="cuda"))]
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that take ``device`` and ``backend`` run once per available (device, backend) pair."""
    if "backend" in metafunc.fixturenames:
        cases = backend_cases()
        metafunc.parametrize(("device", "backend"), cases, ids=[f"{d}-{b}" for d, b in cases])


@dataclass
class OpInputs:
    """The five arguments of ``ddetr.ops.ms_deform_attn`` in the official layout."""

    value: torch.Tensor  # (N, S, M, D)
    spatial_shapes: torch.Tensor  # (L, 2) int64 as (H, W)
    level_start_index: torch.Tensor  # (L,)
    sampling_locations: torch.Tensor  # (N, Lq, M, L, P, 2)
    attention_weights: torch.Tensor  # (N, Lq, M, L, P)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations,
                self.attention_weights)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> OpInputs:
        """Copy with the float tensors moved/cast (shapes and start index stay int64)."""
        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).clone()
        return replace(self, value=conv(self.value), sampling_locations=conv(self.sampling_locations),
                       attention_weights=conv(self.attention_weights),
                       spatial_shapes=self.spatial_shapes.to(device),
                       level_start_index=self.level_start_index.to(device))

    def leaves(self) -> OpInputs:
        """Detached views (same strides) of the float tensors that require grad, for autograd checks."""
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().requires_grad_(True)
        return replace(self, value=leaf(self.value), sampling_locations=leaf(self.sampling_locations),
                       attention_weights=leaf(self.attention_weights))


def _special_locations(loc: torch.Tensor, shapes: list[tuple[int, int]], gen: torch.Generator) -> None:
    """Overwrite coordinates in place with edge cases: borders 0 and 1, pixel centres, pixel -1 and size."""
    for lvl, (h, w) in enumerate(shapes):
        for coord, size in ((0, w), (1, h)):
            view = loc[:, :, :, lvl, :, coord]
            kind = torch.randint(0, 7, view.shape, generator=gen)
            centre = (torch.randint(0, size, view.shape, generator=gen).double() + 0.5) / size
            view[kind == 1] = 0.0
            view[kind == 2] = 1.0
            view[kind == 3] = centre[kind == 3]
            view[kind == 4] = -0.5 / size  # pixel coordinate exactly -1
            view[kind == 5] = (size + 0.5) / size  # pixel coordinate exactly size
            view[kind == 6] = -1.5  # far outside


def make_op_inputs(n: int = 2, lq: int = 3, m: int = 2, d: int = 3,
                   shapes: Sequence[tuple[int, int]] = ((3, 4), (2, 3)), p: int = 2,
                   dtype: torch.dtype = torch.float64, seed: int = 0, special: bool = False,
                   loc_range: tuple[float, float] = (-0.2, 1.2)) -> OpInputs:
    """Random op inputs: value ~ N(0, 1), locations ~ U(loc_range) (some outside the maps), weights ~ U(0, 1).

    ``special`` also puts many coordinates exactly on borders, pixel centres and far outside.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(h), int(w)) for h, w in shapes]
    sizes = [h * w for h, w in shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    value = torch.randn(n, sum(sizes), m, d, generator=gen, dtype=torch.float64)
    lo, hi = loc_range
    loc = lo + (hi - lo) * torch.rand(n, lq, m, len(shapes), p, 2, generator=gen, dtype=torch.float64)
    if special:
        _special_locations(loc, shapes, gen)
    attn = torch.rand(n, lq, m, len(shapes), p, generator=gen, dtype=torch.float64)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    return OpInputs(value, shapes_t, torch.tensor(starts, dtype=torch.long), loc, attn).to(dtype=dtype)


@pytest.fixture
def make_inputs():
    """The random-input factory ``make_op_inputs`` (see its docstring)."""
    return make_op_inputs


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Move every float parameter and buffer off its default init (zero biases and heads, zero offsets, unit
    BatchNorm statistics), so that every weight matters and copies are recognisable: ``std`` x N(0, 1) added, and
    running variances drawn from U(0.5, 1.5). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:
                t.add_(std * torch.randn(t.shape, generator=gen))
    return module


WALL_CLOCK = {"time", "steps_per_s", "data_wait"}  # metrics.jsonl keys that depend on the machine's speed


# ---- the CLI ------------------------------------------------------------------------------------------------------
@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """What stderr leaves on a terminal, less INFO log lines: progress bars redraw with \\r, so keep what
        follows a line's last \\r."""
        visible = [line.rsplit("\r", 1)[-1].strip() for line in self.err.split("\n")]
        return [line for line in visible if line and not line.startswith("INFO ")]


def fresh_log_handler() -> None:
    """Log to stderr as `ddetr` does (main's logging.basicConfig does nothing under pytest, whose capture handler is
    already on the root logger)."""
    drop_log_handlers()
    logging.root.addHandler(LogHandler())
    logging.root.setLevel(logging.INFO)


def drop_log_handlers() -> None:
    for handler in list(logging.root.handlers):
        if type(handler) in (logging.StreamHandler, LogHandler):
            logging.root.removeHandler(handler)


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)`` -> CliResult of ``ddetr ARGV`` in this process (usage errors included): no child process
    and no second torch import."""
    def run(*argv: str | Path) -> CliResult:
        capsys.readouterr()
        fresh_log_handler()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return CliResult(int(code or 0), out, err)
    yield run
    drop_log_handlers()


def ddetr_subprocess(*argv: str | Path, env: dict | None = None, python: list[str] | None = None,
                     timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``python -m ddetr ARGV`` (or ``python PYTHON...``) in a child process with one intra-op thread, for what needs
    a process of its own (being killed, resource limits, environment read at start-up, torchrun). Output decoded by
    hand: text=True would turn progress bars' \\r into line breaks. ``popen``: more subprocess.run arguments."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, *(python or ["-m", "ddetr", *map(str, argv)])]
    result = subprocess.run(command, capture_output=True, env=full_env, timeout=timeout, **popen)
    result.stdout, result.stderr = (data.decode(errors="replace") for data in (result.stdout, result.stderr))
    return result


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, as in the child processes of ``ddetr_subprocess``: the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """`single_thread` for the whole test."""
    with single_thread():
        yield
