"""CPU threads that cope with a busy core: OpenMP threads sleep while they wait, at most one per usable CPU.

PyTorch's intra-op threads (and the fused CPU kernel's, which run on torch's libgomp) are OpenMP threads. By
default libgomp makes a thread that waits at a barrier spin 300000 rounds first. When another process holds a core,
the thread sharing that core is descheduled and its partner spins, at every parallel region: on 2 cores a demo
training step (batch 2, 256 px) went from 0.8 s to 11-15 s next to one busy process. ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep, so the scheduler runs the late thread on the freed core: `ddetr bench contention` then
measured 1.1 s next to a busy process (old settings: 7.8-8.0 s), about 2x a quiet step, as for one thread quiet.

The thread count is not lowered for DataLoader workers or other processes: a thread given up costs about 2x on 2
cores, while a demo worker needs ~28 ms of CPU per batch of 8 (a few % of one core) and, with passive waits, a
busy core costs only its share. It is only capped by the CPUs the process may use (affinity, container quota).

libgomp reads its environment once, when loaded, i.e. at ``import torch``: the ``ddetr`` CLI calls
`set_openmp_defaults` first thing; library users set it before importing torch (``OMP_WAIT_POLICY=PASSIVE python
train.py``). What the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``)
is left alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger("ddetr")

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one means the user chose how threads wait
COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch itself reads for its intra-op thread count


def set_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Default ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a wait policy; True if this set it.

    Takes effect only if it runs before libgomp is loaded (before ``import torch``).
    """
    if any(name in environ for name in WAIT_VARIABLES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time a container's CFS quota allows (``docker --cpus``), None without a quota."""
    try:
        if (root / "cpu.max").is_file():  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 means no quota
        return None if quota <= 0 else quota / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(count, math.ceil(limit)) if limit else count)


def configure_cpu_threads() -> int:
    """At most one intra-op thread per usable CPU, unless ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is set.

    torch counts physical cores (so never more threads than that: hyperthreads do not help it), but not a container's
    CPU quota, under which it oversubscribes. Returns the thread count.
    """
    import torch

    threads, usable = torch.get_num_threads(), usable_cpus()
    if threads <= usable or any(os.environ.get(name) for name in COUNT_VARIABLES):
        return threads
    log.info("CPU: %d intra-op threads, one per usable CPU (torch picked %d)", usable, threads)
    torch.set_num_threads(usable)
    return usable
