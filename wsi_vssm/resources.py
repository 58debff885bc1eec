"""The CPUs and memory this process may really use: its affinity mask (taskset, a SLURM cpuset) and its cgroup's
CPU quota and memory limit (docker --cpus / --memory, a Kubernetes limit). torch, numba and os.cpu_count() see the
host's cores, so in a container limited to 2 CPUs of a 64-core host they would start 64 threads that the quota
then throttles (under a 1-CPU quota on 2 cores, 2026-12-07: whole `predict` commands 1.16-1.17x slower, one
2,048 px forward up to 2.4x; docs/cohorts.md). Light: no torch import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
UNLIMITED_BYTES = 1 << 60  # cgroup v1 writes "no limit" as a huge page-rounded number (9223372036854771712)


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (os.cpu_count() where the platform has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, lowered to its cgroup's CPU quota rounded up (a quota of
    1.5 CPUs gives 2) where one is set. Never raises: cgroup files it cannot read count as no quota."""
    quota = cgroup_cpu_quota(root, proc_cgroup)
    cpus = affinity_cpus()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its parents, v2 `cpu.max` or v1
    `cpu.cfs_quota_us / cpu.cfs_period_us`; None when there is none or it cannot be read."""
    quotas = []
    for folder in _cgroup_folders(root, proc_cgroup, "cpu"):
        v2 = _read(folder / "cpu.max")
        if v2:
            parts = v2.split()
            if len(parts) == 2 and parts[0] != "max" and _positive(parts[0]) and _positive(parts[1]):
                quotas.append(int(parts[0]) / int(parts[1]))
            continue
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period and _positive(quota) and _positive(period):  # v1: -1 is no quota
            quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest memory limit in bytes over this process's cgroup and its parents (v2 `memory.max`, v1
    `memory.limit_in_bytes`); None when there is none or it cannot be read."""
    limits = []
    for folder in _cgroup_folders(root, proc_cgroup, "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(folder / name)
            if value and _positive(value) and int(value) < UNLIMITED_BYTES:
                limits.append(int(value))
    return min(limits) if limits else None


def limit_threads_to_quota() -> int | None:
    """In a fresh command-line process: where a cgroup CPU quota allows fewer CPUs than the affinity mask holds
    and the user set no thread count, set OMP_NUM_THREADS (and MKL's and numba's) to the quota before torch and
    numba start their pools. A process that has already imported either (a library caller, a test calling
    `cli.main`) is left as it is: numba refuses a new NUMBA_NUM_THREADS once its pool runs, and the caller's
    thread settings are its own. Returns the count set, or None when nothing was changed."""
    import sys

    if any(v in os.environ for v in THREAD_VARIABLES) or {"torch", "numba"} & set(sys.modules):
        return None  # the user's choice stands
    cpus = available_cpus()
    if cpus >= affinity_cpus():
        return None
    for v in THREAD_VARIABLES:
        os.environ[v] = str(cpus)
    return cpus


def _cgroup_folders(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """This process's cgroup folder for `controller` and its parents up to the mount, for v2 (one hierarchy) and
    v1 (`root/<controller>`, e.g. `cpu,cpuacct`). In a container the cgroup namespace makes the path `/`, so the
    mount's own files are the container's."""
    text = _read(proc_cgroup, whole=True)
    if text is None:
        return []
    folders = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            mount = root / "unified" if _is(root / "unified" / "cgroup.controllers", "file") else root
        elif controller in controllers.split(","):
            mount = root / controllers if _is(root / controllers, "dir") else root / controller
        else:
            continue
        here = mount / path.lstrip("/")
        while True:
            folders.append(here)
            if here == mount or mount not in here.parents:
                break
            here = here.parent
    return folders


def _is(path: Path, kind: str) -> bool:
    """Path.is_file / is_dir, False where the path cannot be looked at (a sandbox denying /sys/fs/cgroup raises
    PermissionError from them)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError:
        return False


def _read(path: Path, whole: bool = False) -> str | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text if whole else text.strip()


def _positive(text: str) -> bool:
    return text.isdigit() and int(text) > 0
