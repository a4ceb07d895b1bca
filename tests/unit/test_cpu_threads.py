"""A busy CPU: training takes one thread per core the other processes leave free (scripts/bench_threads.py
measured 163 s with torch's default threads against 24 s with one, on 2 cores both kept busy)."""

import subprocess
import sys

import pytest
import torch

from finetune.model import fit_cpu_threads, others_busy_cpus


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def busy_cores():
    """As many spinning processes as there are cores."""
    import os

    import time

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    time.sleep(0.5)  # started and spinning
    yield len(hogs)
    for h in hogs:
        h.kill()
        h.wait()


def test_an_idle_cpu_keeps_torchs_threads(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("finetune.model.others_busy_cpus", lambda: 0.1)
    before = torch.get_num_threads()
    fit_cpu_threads()
    assert torch.get_num_threads() == before


@pytest.mark.slow  # starts a process per core
def test_a_busy_cpu_is_measured_and_trains_with_the_cores_left(threads, busy_cores, monkeypatch, caplog):
    import logging

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert others_busy_cpus() > busy_cores / 2
    torch.set_num_threads(busy_cores)
    with caplog.at_level(logging.INFO, logger="finetune"):
        fit_cpu_threads()
    assert torch.get_num_threads() == 1 and "the CPU is busy" in caplog.text


def test_omp_num_threads_decides_when_set(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr("finetune.model.others_busy_cpus", lambda: 99.0)
    before = torch.get_num_threads()
    fit_cpu_threads()
    assert torch.get_num_threads() == before


@pytest.mark.slow  # starts a process
def test_a_test_subprocess_past_its_timeout_says_the_machine_may_be_busy():
    from tests.helpers import too_slow

    try:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
    except subprocess.TimeoutExpired as e:
        said = too_slow(e)
    assert said.startswith("too slow: machine busy? `") and " s timeout (load average " in said
