"""keep_freed_memory: after it, a freed large tensor's memory is reused without fresh page faults."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

PROBE = """
import resource, sys, torch
from ddetr.engine.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else None
def faults_of_second_tensor():
    for mb in (64, 48):  # above glibc's largest mmap threshold (32 MB); the second fits in the first one's place
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(mb * 2**18)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults_of_second_tensor())
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_large_allocations_reuse_freed_memory():
    with ThreadPoolExecutor() as pool:  # both child processes at once
        (_, default_faults), (applied, faults) = pool.map(probe, ["off", "on"])
    assert applied == "True"
    assert default_faults > 10_000  # 48 MB / 4 KiB pages: glibc unmapped the first tensor, the second faults anew
    assert faults < 1_000  # the second reuses the first one's pages


def test_cli_applies_it_to_cpu_runs_only(monkeypatch):
    import ddetr.engine.malloc as malloc
    from ddetr.cli.common import keep_freed_memory_on_cpu

    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr("ddetr.engine.device.resolve_device", lambda name: torch.device(name))  # as if a GPU
    keep_freed_memory_on_cpu("cuda")
    assert calls == []
    keep_freed_memory_on_cpu("cpu")
    assert calls == [True]
