"""torch's threads for a CPU run: the cores this process may use, less those other processes keep busy right now.

Measured on 2 shared cores: with one of them busy elsewhere the demo's baseline EX stage took 194 s with torch's
default of 2 threads and 98 s with 1; on idle cores 2 threads took 55 s and 1 took 90 s. A thread that waits for a
core stalls every parallel step of the others, so a busy core is left out. OMP_NUM_THREADS, when set,
is the user's choice and kept. CUDA runs are left as torch sets them.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_WINDOW_S = 0.2  # how long the other processes' CPU use is watched before choosing
STAT = Path("/proc/stat")


def set_cpu_threads(environ: dict | None = None) -> int | None:
    """On a CPU run, set torch's intra-op threads (unless OMP_NUM_THREADS is set) and log why; the count, or None."""
    import torch

    if torch.cuda.is_available():
        return None
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        log.info("CPU run: torch uses %d thread(s) (OMP_NUM_THREADS=%s)", torch.get_num_threads(),
                 environ["OMP_NUM_THREADS"])
        return torch.get_num_threads()
    cores = min(usable_cores(), torch.get_num_threads())  # torch's default counts physical cores only
    busy = busy_cores(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    threads = choose_threads(cores, busy)
    torch.set_num_threads(threads)
    log.info("CPU run: torch uses %d thread(s) (%d usable cores, %.1f of them busy with other processes; "
             "set OMP_NUM_THREADS to choose)", threads, cores, busy)
    return threads


def choose_threads(cores: int, busy: float) -> int:
    """The usable cores less the busy ones (a core at least half busy counts), at least 1."""
    return max(1, cores - int(busy + 0.5))


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), capped by a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, int(quota + 0.5))) if quota else cores


def cpu_quota() -> float | None:
    """The cgroup's CPU limit in cores (v2 cpu.max, or v1 cfs quota / period), None when unlimited or unknown."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            v1 = Path("/sys/fs/cgroup/cpu")
            quota, period = (v1 / "cpu.cfs_quota_us").read_text(), (v1 / "cpu.cfs_period_us").read_text()
        if quota.strip() in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def busy_cores(cpus: list[int] | None, seconds: float = BUSY_WINDOW_S) -> float:
    """How many of these CPUs other processes keep busy, watched for `seconds` (this process sleeps meanwhile);
    0 where /proc/stat cannot be read."""
    try:
        before = STAT.read_text()
        time.sleep(seconds)
        after = STAT.read_text()
    except OSError:
        return 0.0
    return busy_between(before, after, cpus)


def busy_between(before: str, after: str, cpus: list[int] | None) -> float:
    """The busy cores between two /proc/stat snapshots: per CPU, 1 - its share of idle and iowait time."""
    first, second = cpu_times(before), cpu_times(after)
    busy = 0.0
    for cpu in first.keys() & second.keys():
        if cpus is not None and cpu not in cpus:
            continue
        total = sum(second[cpu]) - sum(first[cpu])
        idle = (second[cpu][3] + second[cpu][4]) - (first[cpu][3] + first[cpu][4])
        busy += 1 - idle / total if total > 0 else 0.0
    return busy


def cpu_times(stat: str) -> dict[int, list[int]]:
    """{cpu number: its time counters} from /proc/stat's cpuN lines (user nice system idle iowait ...)."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit():
            times[int(name[3:])] = [int(f) for f in fields]
    return times
