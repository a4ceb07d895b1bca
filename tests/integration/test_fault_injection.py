"""Writes failing at points spread over a run (a full disk: checkpoints, metrics, the adapter, summary.json). Each is
one message, and the same run then finishes with resume=true: the adapter is the uninterrupted run's, bit for bit.
FAULT_POINTS=N tries N points instead of 2 (the long version)."""

import errno
import json
import os

import peft.peft_model
import pytest
import torch
from safetensors.torch import load_file

import finetune.run
import finetune.tracking

pytestmark = pytest.mark.slow
POINTS = int(os.environ.get("FAULT_POINTS", "2"))
WRITERS = [(peft.peft_model, "safe_save_file"), (torch, "save"), (finetune.tracking.MetricsLog, "append"),
           (finetune.run.Run, "write_summary")]


class Faults:
    """Counts the writes of a run, and makes the `fail_at`-th one fail as a full disk would."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at = [], fail_at
        for owner, name in WRITERS:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, real, name):
        def write(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return write


@pytest.fixture(scope="module")
def run_args(tiny_args):
    return lambda out, *extra: tiny_args(out, "train.save_steps=1", "train.save_total_limit=2", *extra)


@pytest.fixture(scope="module")
def uninterrupted(run_args, tmp_path_factory):
    from _pytest.monkeypatch import MonkeyPatch

    from tests.helpers import run_main

    out = tmp_path_factory.mktemp("whole") / "run"
    with MonkeyPatch.context() as m:
        faults = Faults(m)
        assert run_main(*run_args(out)).returncode == 0
    return out, len(faults.calls)


@pytest.mark.parametrize("point", range(POINTS))
def test_a_write_failing_anywhere_is_one_message_and_the_run_resumes_exactly(uninterrupted, run_args, cli, tmp_path,
                                                                              monkeypatch, point):
    whole, writes = uninterrupted
    fail_at = 1 + (point * 2 + 1) * writes // (2 * POINTS)  # spread over the run: early and late (more: mid-run)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        faults = Faults(m, fail_at)
        failed = cli(*run_args(out))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, (faults.calls[-1], failed.stderr[-2000:])
    said = failed.stderr.split("error: ", 1)[1]
    assert "No space left on device" in said and ("resume=true" in said or "run the same command" in said), said
    resumed = cli(*run_args(out, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (whole, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"write {fail_at} ({faults.calls[-1]})"
    assert json.loads((out / "summary.json").read_text())["steps"] == json.loads(
        (whole / "summary.json").read_text())["steps"]
