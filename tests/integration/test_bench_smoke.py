"""scripts/bench.py --cpu-smoke keeps the GPU benchmark working: both paths run on the same rows (in this process;
on a GPU each gets a fresh one). No timing is asserted (CPU figures mean nothing); the same
math is: padding-free batches change no loss."""

import json

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow


def test_bench_cpu_smoke_runs_both_paths_on_the_same_math(tmp_path):
    out = tmp_path / "bench.json"
    assert run_script("bench", "--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path / "w")) == 0
    report = json.loads(out.read_text())
    for path in ("vanilla", "ours"):
        assert report[path]["tokens_per_second"] > 0 and report[path]["median_step_s"] > 0
        assert len(report[path]["losses"]) == report["steps"]
    assert report["loss_max_rel_diff_first_steps"] < 0.01  # same rows, same order, same LoRA init
    assert "| ours / vanilla |" in out.with_suffix(".md").read_text()
