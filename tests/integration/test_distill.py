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
