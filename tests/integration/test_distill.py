"""`distill`: a student trained on a teacher's stored top-k (the shared tiny run's merged model teaches the tiny base).
The teacher runs once, is let go before the student trains, and is not needed again while its store is there."""

import gc
import json
import os
import shutil
import signal
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import finetune.distill
import finetune.pipeline
import finetune.trainer
from finetune.plan import make_plan
from finetune.registry import load_config

pytestmark = pytest.mark.slow


def test_a_student_learns_from_the_stored_teacher_alone(tiny_run, tiny_args, cli, tmp_path, monkeypatch):
    _, _, teacher = tiny_run
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    teachers, alive = [], []
    real_topk, real_loss = finetune.distill.topk_of_row, finetune.trainer.distillation_loss

    def topk(model, *args):
        teachers.append(weakref.ref(model))
        return real_topk(model, *args)

    def loss(*args):
        gc.collect()
        alive.append(any(t() is not None for t in teachers))
        return real_loss(*args)

    monkeypatch.setattr(finetune.distill, "topk_of_row", topk)
    monkeypatch.setattr(finetune.trainer, "distillation_loss", loss)
    out = tmp_path / "student"
    result = cli("distill", f"teacher={teacher}", *tiny_args(out, "distill.top_k=8", "distill.alpha=0.9"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert teachers and alive and not any(alive)  # the teacher's pass ran, and no student step saw it in memory
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    divergence = [r["distill_divergence"] for r in logs]
    assert len(divergence) == 4 and divergence[-1] < divergence[0]
    assert all(r["loss"] == pytest.approx(0.9 * r["distill_divergence"] + 0.1 * r["distill_cross_entropy"], rel=1e-3)
               for r in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distill"]["teacher"] == str(teacher) and summary["eval_loss"] < summary["eval_loss_base"]
    assert summary["tokens_per_second"] > 0 and all(r["tokens_per_second"] > 0 for r in logs[1:])
    # plan's teacher pass: its store is at most what was planned; `eval compare=` counts the student's GPU-hours as
    # the teacher's pass and its own training
    planned = make_plan(load_config(tiny_args(out, "distill.top_k=8", f"distill.teacher={teacher}",
                                              "plan.gpu=a100-80gb")))["teacher"]
    store = sum(f.stat().st_size for f in finetune.distill.store_dir().glob("topk-*"))
    assert 0 < store <= planned["store_gb"] * 1e9 and 0 < summary["distill"]["teacher_tokens"] <= planned["tokens"]
    compared = cli("eval", f"run={teacher}", f"compare={out}", "plan.gpu=a100-80gb", "data.eval_max_samples=8")
    assert compared.returncode == 0, compared.stderr[-2000:]
    student = json.loads((teacher / "compare" / "eval.json").read_text())["rows"][1]
    steps = student["made_by"]
    assert student["kind"] == "distilled" and len(steps) == 2 and "the teacher's pass over" in steps[0]["step"]
    assert all(s["own"] and s["gpu_hours"] > 0 for s in steps)
    assert student["gpu_hours"] == student["gpu_hours_total"] == pytest.approx(sum(s["gpu_hours"] for s in steps))
    # SIGTERM during step 3, then resume=true: the store is read back (no teacher pass) and the adapter is the
    # uninterrupted run's, bit for bit
    calls, again = len(teachers), tmp_path / "again"
    real_build = finetune.pipeline.build_trainer
    monkeypatch.setattr(finetune.pipeline, "build_trainer", lambda *a, **k: real_build(*a[:-1], [*a[-1], SigtermAt(2)], **k))
    settings = tiny_args(again, "distill.top_k=8", "distill.alpha=0.9", "train.save_steps=1")
    assert cli("distill", f"teacher={teacher}", *settings).returncode == 75
    monkeypatch.setattr(finetune.pipeline, "build_trainer", real_build)
    resumed = cli("distill", f"teacher={teacher}", *settings, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(teachers) == calls
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_divergence_stops_the_student_at_its_last_good_checkpoint(tiny_run, tiny_args, tmp_path,
                                                                              monkeypatch):
    """The NaN guard acts on a distilling run as on SFT: the divergence made NaN at step 3 stops the run, naming
    the step and the checkpoint it keeps (whose weights are finite)."""
    from finetune.errors import UserError

    _, _, teacher = tiny_run
    real, calls = finetune.distill.distill_loss, []

    def nan_at_step_3(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(finetune.distill, "distill_loss", nan_at_step_3)
    out = tmp_path / "student"
    with pytest.raises(UserError) as e:
        finetune.pipeline.train(load_config(tiny_args(out, f"distill.teacher={teacher}", "distill.top_k=8",
                                                      "train.save_steps=2", "train.max_bad_steps=0")))
    assert "Non-finite loss or gradient at step 3" in str(e.value) and "checkpoint-2, is kept" in str(e.value)
    kept = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values()) and not (out / "adapter").exists()


class SigtermAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_what_distill_refuses(tiny_run, tiny_args, cli, tmp_path):
    from tests.helpers import ROOT

    _, _, teacher = tiny_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "summary.json"):
        shutil.copy(teacher / name, unfinished / name)
    cases = {
        "needs its teacher": (),
        "number their words differently": (f"teacher={ROOT / 'finetune' / 'assets' / 'tiny_llama'}",),
        "neither an adapter (adapter/) nor a merged model": (f"teacher={unfinished}",),
        "distill.top_k=100000: the teacher's vocabulary has": (f"teacher={teacher}", "distill.top_k=100000"),
        "data.packing=true: packing splits and reorders rows": (f"teacher={teacher}", "data.packing=true"),
    }
    for said, args in cases.items():
        result = cli("distill", *args, *tiny_args(tmp_path / "out"))
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
