"""The CPUs and memory a run may use, read from its cgroup (a container's --cpus / --memory, a Kubernetes limit):
torch and numba saw the host's cores and started threads that the quota then throttled (whole predict commands
1.16-1.17x slower under a 1-CPU quota on 2 cores, one forward up to 2.4x), and a memory limit killed a run with no
message (exit 137)."""

from __future__ import annotations

import os
import sys

from conftest import run_cli_captured

from wsi_vssm import resources


def _tree(tmp_path, proc: str, files: dict[str, str]):
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_quota_is_the_tightest_over_the_parents(tmp_path, monkeypatch):
    root, proc = _tree(tmp_path, "0::/user.slice/job.scope\n", {
        "cgroup.controllers": "cpu memory",
        "user.slice/cpu.max": "max 100000",
        "user.slice/job.scope/cpu.max": "150000 100000",  # 1.5 CPUs
        "user.slice/memory.max": "1073741824",
        "user.slice/job.scope/memory.max": "max",
    })
    assert resources.cgroup_cpu_quota(root, proc) == 1.5
    assert resources.cgroup_memory_limit(root, proc) == 1 << 30  # the parent's limit binds the child
    monkeypatch.setattr(resources, "affinity_cpus", lambda: 64)
    assert resources.available_cpus(root, proc) == 2  # 1.5 CPUs rounded up, not the host's 64
    monkeypatch.setattr(resources, "affinity_cpus", lambda: 1)
    assert resources.available_cpus(root, proc) == 1  # a tighter affinity mask wins


def test_cgroup_v1_quota_and_memory_and_no_limits(tmp_path):
    root, proc = _tree(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",  # the host: no quota
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "memory/docker/abc/memory.limit_in_bytes": str(900 << 20),
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
    })
    assert resources.cgroup_cpu_quota(root, proc) == 0.5
    assert resources.cgroup_memory_limit(root, proc) == 900 << 20
    free, proc_free = _tree(tmp_path / "free", "0::/\n", {"cgroup.controllers": "", "cpu.max": "max 100000"})
    assert resources.cgroup_cpu_quota(free, proc_free) is None
    assert resources.cgroup_memory_limit(free, proc_free) is None
    assert resources.cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None  # no cgroup files: no limit


def test_cgroup_layouts_hybrid_v1_cpu_only_and_a_namespaced_path(tmp_path):
    # hybrid: v2 mounted at unified/ holds no CPU controller; the quota is v1's, at a mount named `cpu` alone
    root, proc = _tree(tmp_path, "3:cpu:/\n0::/\n", {
        "unified/cgroup.controllers": "hugetlb",
        "cpu/cpu.cfs_quota_us": "300000",
        "cpu/cpu.cfs_period_us": "100000",
    })
    assert resources.cgroup_cpu_quota(root, proc) == 3.0
    # a host path that does not exist inside the container's mount: the walk up reaches the mount's own files
    root, proc = _tree(tmp_path / "c", "2:cpu,cpuacct:/docker/abc/gone\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "200000",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
    })
    assert resources.cgroup_cpu_quota(root, proc) == 2.0


def test_unreadable_cgroup_files_count_as_no_limit(tmp_path, monkeypatch):
    """A sandbox that denied stat on /sys/fs/cgroup ended predict, evaluate, extract, train and run in
    "/sys/fs/cgroup/memory: Permission denied" (Path.is_dir raises PermissionError)."""
    from pathlib import Path

    root, proc = _tree(tmp_path, "4:memory:/a\n2:cpu,cpuacct:/a\n0::/a\n", {
        "memory/a/memory.limit_in_bytes": str(1 << 30),
        "cpu,cpuacct/a/cpu.cfs_quota_us": "100000",
        "cpu,cpuacct/a/cpu.cfs_period_us": "100000",
    })

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    for method in ("is_dir", "is_file", "read_text", "stat"):
        monkeypatch.setattr(Path, method, denied)
    assert resources.cgroup_memory_limit(root, proc) is None and resources.cgroup_cpu_quota(root, proc) is None
    assert resources.available_cpus(root, proc) == resources.affinity_cpus()  # the mask alone, no error


def test_threads_follow_the_quota_in_a_fresh_process_unless_the_user_chose():
    """Run as the command line starts: before torch and numba. A process that imported them is left alone
    (numba refuses a new NUMBA_NUM_THREADS once its pool runs)."""
    import subprocess

    probe = ("import os, sys; from wsi_vssm import resources; resources.available_cpus = lambda: 2; "
             "resources.affinity_cpus = lambda: 64; n = resources.limit_threads_to_quota(); "
             "print(n, os.environ.get('OMP_NUM_THREADS'), os.environ.get('NUMBA_NUM_THREADS'), "
             "'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in resources.THREAD_VARIABLES}

    def run(extra: dict, pre: str = "") -> str:
        return subprocess.run([sys.executable, "-c", pre + probe], env={**env, **extra}, capture_output=True,
                              text=True, check=True).stdout.split()

    assert run({}) == ["2", "2", "2", "False"]  # the quota's 2 of the host's 64
    assert run({"OMP_NUM_THREADS": "7"}) == ["None", "7", "None", "False"]  # the user's choice stands
    assert run({}, "import numba; ") == ["None", "None", "None", "False"]  # numba's pool may be running


def test_local_dask_workers_share_the_cpus_the_run_may_use(monkeypatch):
    """--workers 4 gave each worker os.cpu_count() // 4 threads, the host's cores, and overrode the user's own
    OMP_NUM_THREADS (a SLURM job of 8 CPUs on a 64-core node: 4 x 16 threads)."""
    from wsi_vssm.runs import dask as dask_runs

    monkeypatch.setattr(dask_runs, "available_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert dask_runs.worker_threads(4) == 2 and dask_runs.worker_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert dask_runs.worker_threads(2) == 1  # the user's count is a ceiling


def test_a_low_memory_limit_is_warned_of_before_the_run(monkeypatch, tmp_path, capsys):
    import warnings

    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: 900 << 20)
    monkeypatch.setattr(resources, "limit_threads_to_quota", lambda: None)

    def run(args):  # each call shows its warnings: Python's default shows one text from one place once
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return run_cli_captured(args, capsys)

    code, out, err = run(["predict", tmp_path / "missing.svs", "--out", tmp_path / "o"])
    lines = err.splitlines()
    assert code == 1 and len(lines) == 2, err
    assert lines[0].startswith("wsi-vssm: warning: this process may use 0.88 GiB") and "exit 137" in lines[0]
    assert "missing.svs" in lines[1]
    code, out, err = run(["info", tmp_path / "missing.svs"])  # a light command: no warning
    assert "GiB" not in err
    (tmp_path / "predict").mkdir()  # a folder named like a heavy command is no command
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["compare", "predict", "predict"])
    assert "GiB" not in err and "no predictions.csv" in err
    code, out, err = run(["predict", "missing.svs"])  # the same warning again, where it belongs: shown
    assert "0.88 GiB" in err
