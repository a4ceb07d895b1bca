"""scripts/gpu_evidence.sh --cpu-smoke keeps the one GPU run working: every stage it runs on a GPU runs here on the
tiny model (in this process), so a broken path shows before GPU time is spent on it. No timing or memory is
asserted (CPU figures mean nothing); the same math is: our path's losses against the vanilla stack's."""

import json
import tarfile

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow


def test_gpu_evidence_cpu_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    assert run_script("gpu_evidence", "--cpu-smoke", "--out", str(out)) == 0
    report = json.loads((out / "evidence.json").read_text())
    jobs = {r["name"]: r for r in report["jobs"]}
    trained = [r for r in jobs.values() if r["kind"] != "fsdp"]
    assert len(trained) == 4 and all(r["exit"] == 0 and r["planned_gb"] > 0 for r in trained)
    assert {r["quant"] for r in trained} == {"nf4", "int8", "none"}
    assert jobs["QLoRA + merge (export=merged)"]["merge_base"] == "original"
    checked = jobs["QLoRA + merge (export=merged)"]  # the check the FSDP runs get on a GPU: the adapter loads, acts
    assert checked["adapter_loads"] and checked["adapter_tensors"] > 0 and checked["adapter_max_logit_change"] > 0
    for r in (r for r in jobs.values() if r["kind"] == "fsdp"):  # accelerate's FSDP needs CUDA: refused, one message
        assert r["exit"] == 2 and "needs CUDA GPUs" in r["failed"]
    bench = report["bench"]["tiny"]
    for path in ("vanilla", "ours"):
        assert bench[path]["tokens_per_second"] > 0 and len(bench[path]["losses"]) == bench["steps"]
    assert bench["loss_max_rel_diff_first_steps"] < 0.01  # same rows, same order, same LoRA init
    assert "| ours / vanilla |" in (out / "evidence.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/fsdp-0.log", "logs/train-3.log"} <= set(tar.getnames())
