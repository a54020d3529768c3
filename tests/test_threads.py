"""CPU threading defaults (ddetr.engine.threads): passive OpenMP waits set before torch loads libgomp, thread
counts capped by affinity and container quotas, and whatever the user set left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ddetr.cli import common
from ddetr.engine import malloc, threads


@pytest.mark.parametrize(("given", "expected"), [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active"}),
    ({"GOMP_SPINCOUNT": "1000"}, {"GOMP_SPINCOUNT": "1000"}),
])
def test_openmp_defaults_never_override_the_user(given, expected):
    environ = dict(given)
    assert threads.set_openmp_defaults(environ) == (not given)
    assert environ == expected


def omp_environment(extra: dict[str, str]) -> str:
    """libgomp's own report of its settings when `ddetr eval` (which imports torch, then fails on the data) runs."""
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    env.update(extra, OMP_DISPLAY_ENV="verbose", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "ddetr", "eval", "--data", "/nonexistent", "--checkpoint", "x"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert "annotation file not found" in done.stderr, done.stderr[-2000:]
    return done.stderr


def test_cli_makes_libgomp_wait_passively():
    """The CLI sets the policy before torch loads libgomp (spin count 0 instead of 300000); a user's choice wins."""
    with ThreadPoolExecutor() as pool:  # two child processes at once: each mostly waits on its imports
        default, users = pool.map(omp_environment, [{}, {"GOMP_SPINCOUNT": "1234"}])
    assert "GOMP_SPINCOUNT = '0'" in default
    assert "GOMP_SPINCOUNT = '1234'" in users


def test_cgroup_cpu_limit(tmp_path):
    """cgroup v2 cpu.max and v1 cfs quota/period; no quota or no files mean no limit."""
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_usable_cpus_is_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpus() == 4
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.usable_cpus() == 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_cpu_commands_cap_threads_at_usable_cpus(monkeypatch):
    """Through the CLI's CPU setup: torch's count drops to the usable CPUs, is never raised, and an explicit
    OMP_NUM_THREADS is left alone."""
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: True)  # process-wide; not wanted in the test run
    for name in threads.COUNT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    common.keep_freed_memory_on_cpu("cpu")
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    assert threads.configure_cpu_threads() == 1 and torch.get_num_threads() == 1  # not raised
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    assert threads.configure_cpu_threads() == 2 and torch.get_num_threads() == 2
