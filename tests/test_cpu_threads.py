"""torch's threads on a CPU run: one per usable core that other processes leave free, OMP_NUM_THREADS kept."""
import logging
import os

import pytest
import torch

from scripts import cpu_threads
from scripts.cpu_threads import busy_between, choose_threads, cpu_times, set_cpu_threads

# two /proc/stat snapshots 1 s apart (100 ticks per CPU): cpu0 idle all along, cpu1 busy 80 of its 100 ticks
BEFORE = "cpu  300 0 100 1000 0 0 0 0 0 0\ncpu0 100 0 50 500 0 0 0 0 0 0\ncpu1 200 0 50 500 0 0 0 0 0 0\n\nintr 1"
AFTER = "cpu  380 0 100 1120 0 0 0 0 0 0\ncpu0 100 0 50 600 0 0 0 0 0 0\ncpu1 270 0 60 515 5 0 0 0 0 0\n\nintr 2"


@pytest.fixture
def torch_threads():
    """torch's thread count as it was, restored after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_busy_cores_are_read_per_cpu_from_proc_stat():
    assert cpu_times(BEFORE) == {0: [100, 0, 50, 500, 0, 0, 0, 0, 0, 0], 1: [200, 0, 50, 500, 0, 0, 0, 0, 0, 0]}
    assert busy_between(BEFORE, AFTER, None) == pytest.approx(0.8)  # iowait counts as idle
    assert busy_between(BEFORE, AFTER, [0]) == 0.0  # a CPU outside the process's affinity is not counted


def test_a_busy_core_is_left_out_down_to_one_thread():
    assert [choose_threads(2, busy) for busy in (0.0, 0.4, 0.5, 1.0, 2.0, 5.0)] == [2, 2, 1, 1, 1, 1]
    assert choose_threads(8, 2.6) == 5


@pytest.mark.parametrize("busy, threads", [(0.1, 2), (1.0, 1)])
def test_cpu_run_sets_one_thread_per_free_core(monkeypatch, caplog, torch_threads, busy, threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cpus: busy)
    torch.set_num_threads(2)  # torch's default on 2 physical cores
    with caplog.at_level(logging.INFO, logger="scripts.cpu_threads"):
        assert set_cpu_threads(environ={}) == threads
    assert torch.get_num_threads() == threads
    assert f"torch uses {threads} thread(s) (2 usable cores, {busy:.1f} of them busy" in caplog.text


def test_omp_num_threads_is_kept_and_cuda_runs_are_left_alone(monkeypatch, torch_threads):
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cpus: pytest.fail("nothing to measure"))
    torch.set_num_threads(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set_cpu_threads(environ={"OMP_NUM_THREADS": "2"}) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set_cpu_threads(environ={}) is None and torch.get_num_threads() == 2


def test_usable_cores_follow_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 1.0)
    assert cpu_threads.usable_cores() == 1
    for quota in (None, 1024.0):  # no limit, or one above the CPUs the process may run on
        monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: quota)
        assert cpu_threads.usable_cores() == len(os.sched_getaffinity(0))
