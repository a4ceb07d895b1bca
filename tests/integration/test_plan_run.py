"""train.auto_fit inside a real run."""

import json

import pytest


@pytest.mark.slow
def test_auto_fit_on_a_cpu_run_says_why_it_changed_nothing(tiny_args, cli, tmp_path):
    out = tmp_path / "run"
    result = cli(*tiny_args(out, "train.max_steps=2", "train.micro_batch_size=4", "train.auto_fit=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auto_fit"] == {"applied": False, "reason": "no CUDA GPU: the plan models GPU memory"}
    assert summary["micro_batch_size"] == 4 and summary["peak_memory_reserved_gb"] is None
