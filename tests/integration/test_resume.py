"""Nothing lost: resume is exact, a signal stops at a checkpoint, checkpoints are atomic, bad ones are skipped.

The uninterrupted run is the shared tiny run (tests/conftest.py: 16 steps, a checkpoint every 2); the runs
that resume it pass the same overrides, in this process."""

import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RUN_SHARED
from tests.conftest import TINY_RUN_STEPS as STEPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def args(tiny_args):
    """The shared run's overrides for output_dir `out` (resumed runs export the adapter only)."""
    return lambda out, *extra: tiny_args(out, *TINY_RUN_SHARED, "export=adapter", *extra)


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
    _, _, out = tiny_run
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")) == list(range(2, 17, 2))
    assert not (out / "checkpoints" / ".staging").exists()  # written under a staging name, then renamed
    return out


def interrupted_copy(run, tmp_path, at_step):
    """The run as if it had stopped right after checkpoint `at_step`."""
    copy = tmp_path / f"at{at_step}"
    shutil.copytree(run, copy)
    for p in (copy / "checkpoints").glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > at_step:
            shutil.rmtree(p)
    for folder in ("adapter", "merged"):
        shutil.rmtree(copy / folder)
    (copy / "summary.json").unlink()
    return copy  # metrics.jsonl goes on past at_step, as when a run is killed after a checkpoint


@pytest.mark.parametrize("at_step", [6, 14], ids=["mid-epoch", "later-epoch"])
def test_resume_is_exact(uninterrupted, args, cli, tmp_path, at_step):
    run = interrupted_copy(uninterrupted, tmp_path, at_step)
    result = cli(*args(run, "resume=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(run) == losses(uninterrupted)  # every step's loss, bit for bit
    a, b = adapter(uninterrupted), adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the records describe the whole run: tokens and time of both parts, the base measured once, at the start
    s, u = (json.loads((r / "summary.json").read_text()) for r in (run, uninterrupted))
    assert s["train_tokens"] == u["train_tokens"] and s["eval_loss_base"] == u["eval_loss_base"]
    assert s["train_loss"] == pytest.approx(u["train_loss"], rel=1e-3)  # every step is logged (4 decimals)
    before = json.loads((run / "checkpoints" / f"checkpoint-{at_step}" / "trainer_state.json").read_text())
    assert s["train_runtime_s"] > before["stateful_callbacks"]["RunTotals"]["args"]["seconds"] > 0
    assert "resume: the base's figures are those measured when the run started" in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r].count(0) == 1


def test_a_resumed_run_continues_its_wandb_run(tiny_args, cli, tmp_path):
    out = tmp_path / "run"
    run = [*tiny_args(out, "tracking=wandb", "train.save_steps=2"), "tracking.mode=offline"]
    assert cli(*run).returncode == 0
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if killed after checkpoint-2
    result = cli(*run, "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1  # one W&B run id, resumed


def test_resume_skips_incomplete_and_corrupt_checkpoints(uninterrupted, args, cli, tmp_path):
    run = interrupted_copy(uninterrupted, tmp_path, STEPS)
    ckpts = run / "checkpoints"
    weights = ckpts / "checkpoint-16" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    (ckpts / "checkpoint-14" / "trainer_state.json").unlink()  # missing trainer state
    (ckpts / "checkpoint-12" / "optimizer.pt").write_bytes(b"")  # an interrupted write
    (ckpts / ".staging" / "checkpoint-18").mkdir(parents=True)  # a write that never finished
    result = cli(*args(run, "resume=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name, why in (("checkpoint-16", "adapter_model.safetensors is unreadable"),
                      ("checkpoint-14", "no trainer_state.json"), ("checkpoint-12", "no optimizer.pt")):
        assert f"Skipping {name} for resume: {why}" in result.stderr
    # resumed from checkpoint-10 and redid 11-16: the same adapter as the uninterrupted run
    a, b = adapter(uninterrupted), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ckpts / "checkpoint-16" / "adapter_model.safetensors").stat().st_size == (
        uninterrupted / "checkpoints" / "checkpoint-16" / "adapter_model.safetensors").stat().st_size  # rewritten


def test_sigterm_writes_a_checkpoint_and_resume_finishes(args, cli, tmp_path, monkeypatch):
    """A real SIGTERM, sent to this process during step 3 (the CLI runs in it: no second interpreter to start)."""
    import os

    from transformers import TrainerCallback

    import finetune.pipeline as pipeline

    class SignalAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    real = pipeline.build_trainer
    monkeypatch.setattr(pipeline, "build_trainer", lambda *a, **k: real(*a[:-1], [*a[-1], SignalAtStep3()], **k))
    out = tmp_path / "run"
    stopped = cli(*args(out, "train.save_steps=100"))
    monkeypatch.undo()
    stderr = stopped.stderr
    assert stopped.returncode == 75, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = int(last.split("at step ")[1].split(";")[0])
    assert 3 <= step < STEPS and last.startswith(f"stopped by SIGTERM at step {step}; checkpoint saved in ")
    assert "resume=true" in last and f"output_dir={out}" in last and "Traceback" not in stderr
    assert (out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    result = cli(*args(out, "train.save_steps=100", "resume=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and json.loads((out / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize("error, safetensors", [("EROFS", False), ("ENOSPC", True)],
                         ids=["read-only folder", "disk full in safetensors"])  # an OSError ENOSPC: test_fault_injection
def test_a_failed_checkpoint_write_is_one_error_and_keeps_the_previous(args, tmp_path, monkeypatch, error, safetensors):
    """Simulated: as root, a folder cannot be made read-only for the test, so the write fails as the OS would, or as
    safetensors reports it (its own error type, carrying the OS error's text)."""
    from safetensors import SafetensorError

    import errno
    import os

    import transformers

    import finetune.pipeline as pipeline
    from finetune.errors import UserError
    from finetune.registry import load_config

    real = transformers.Trainer._save_checkpoint
    calls = []

    def disk_full_on_second(self, model, trial):
        calls.append(self.state.global_step)
        if len(calls) == 2:
            code = getattr(errno, error)
            if safetensors:
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            raise OSError(code, os.strerror(code))
        return real(self, model, trial)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", disk_full_on_second)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        pipeline.train(load_config(args(out)))
    assert "Could not write checkpoint-4 to" in str(e.value) and os.strerror(getattr(errno, error)) in str(e.value)
    assert "The previous checkpoint, checkpoint-2, is intact" in str(e.value)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (ckpts / ".staging").exists()
    from finetune.checkpoints import checkpoint_problem

    assert checkpoint_problem(ckpts / "checkpoint-2") is None


@pytest.mark.parametrize("max_bad_steps", [0, 1])
def test_a_non_finite_loss_stops_the_run_or_is_skipped(args, tmp_path, monkeypatch, max_bad_steps):
    """Step 5's loss is made NaN: with max_bad_steps=0 the run stops, naming the step and the checkpoint it
    keeps; with 1 the step's update is skipped and training goes on with finite weights."""
    import trl

    import finetune.pipeline as pipeline
    from finetune.errors import UserError
    from finetune.registry import load_config

    real = trl.SFTTrainer.compute_loss

    def nan_at_step_5(self, model, inputs, *a, **kw):
        out = real(self, model, inputs, *a, **kw)
        if self.state.global_step + 1 == 5 and model.training:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", nan_at_step_5)
    out = tmp_path / "run"
    cfg = load_config(args(out, "train.max_steps=8", f"train.max_bad_steps={max_bad_steps}"))
    if max_bad_steps == 0:
        with pytest.raises(UserError) as e:
            pipeline.train(cfg)
        assert "Non-finite loss or gradient at step 5" in str(e.value)
        assert "The last good checkpoint, checkpoint-4, is kept" in str(e.value) and "resume=true" in str(e.value)
        kept = load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in kept.values())
        assert not (out / "adapter").exists()
    else:
        summary = pipeline.train(cfg)
        assert summary["skipped_bad_steps"] == [5] and summary["steps"] == 8
        weights = adapter(out)
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert summary["eval_loss"] < summary["eval_loss_base"]


def test_resume_skips_checkpoints_with_truncated_or_garbled_files(uninterrupted, args, cli, tmp_path):
    """Half an optimizer.pt, half an rng_state.pth, a 10-byte scheduler.pt, a trainer_state.json of the wrong
    shape: each is found (torch's files are zip archives with checksums; nothing is unpickled) and skipped."""
    run = interrupted_copy(uninterrupted, tmp_path, STEPS)
    ckpts = run / "checkpoints"

    def halve(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    halve(ckpts / "checkpoint-16" / "optimizer.pt")
    halve(ckpts / "checkpoint-14" / "rng_state.pth")
    (ckpts / "checkpoint-12" / "scheduler.pt").write_bytes(b"0123456789")
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text('["not", "a", "state"]')
    result = cli(*args(run, "resume=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name, why in (("checkpoint-16", "optimizer.pt is unreadable"), ("checkpoint-14", "rng_state.pth is unreadable"),
                      ("checkpoint-12", "scheduler.pt is unreadable"),
                      ("checkpoint-10", "trainer_state.json does not hold a trainer state")):
        assert f"Skipping {name} for resume: {why}" in result.stderr
    a, b = adapter(uninterrupted), adapter(run)  # resumed from checkpoint-8: the same adapter
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_the_last_checkpoint_only_finishes(uninterrupted, args, cli, tmp_path):
    """Killed during its final eval or export, a run resumes from its last checkpoint to train nothing more: the
    same steps, the same adapter, no step logged twice."""
    run = interrupted_copy(uninterrupted, tmp_path, STEPS)
    result = cli(*args(run, "resume=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    a, b = adapter(uninterrupted), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_refuses_a_setting_its_checkpoints_cannot_carry(uninterrupted, args, cli, tmp_path):
    run = interrupted_copy(uninterrupted, tmp_path, 8)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for extra, said in ((["lora.r=16"], "lora.r=16 (the run has 32)"),
                        (["train.seed=1"], "train.seed=1 (the run has 42)"),
                        (["train.micro_batch_size=4"], "an effective batch (train.micro_batch_size x train.grad_accum) "
                                                       "of 4 (the run has 8")):
        result = cli(*args(run, "resume=true", *extra))
        assert result.returncode == 2 and "resume=true cannot continue the run with " + said in result.stderr
        assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_a_resume_logs_a_deliberate_change_and_a_longer_schedule_trains_on(uninterrupted, args, cli, tmp_path):
    run = interrupted_copy(uninterrupted, tmp_path, STEPS)
    result = cli(*args(run, "resume=true", f"train.max_steps={STEPS + 2}", "train.learning_rate=1e-3",
                       "train.micro_batch_size=4", "train.grad_accum=2"))
    assert result.returncode == 0, result.stderr[-2000:]
    for said in (f"train.max_steps={STEPS + 2} (was {STEPS})", "train.learning_rate=0.001 (was 0.003)",
                 "train.micro_batch_size=4 (was 8)"):
        assert f"resume: {said}, a deliberate change" in result.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS + 2
    assert sorted(losses(run)) == list(range(1, STEPS + 3))
    assert "learning_rate: 0.001" in (run / "config.yaml").read_text()
