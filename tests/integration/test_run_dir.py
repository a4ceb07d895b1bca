"""A run directory is never written by two processes at once, and a run that stopped before its first checkpoint
never blocks the command that started it (finetune/run.py: the lock and failed_start)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from finetune.run import LOCK, process_start


@pytest.fixture
def other_process():
    """A live process that is not this one: the owner of a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "start": process_start(pid), "since": "earlier"})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def written_run(out, tiny_args):
    """A run directory as training writes it first: config.yaml (and the lock, while it runs)."""
    from finetune.registry import load_config, to_yaml

    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_config(tiny_args(out))))
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a trained run: not a failed start
    return out


@pytest.mark.slow  # starts a process
def test_a_run_another_process_writes_is_refused_by_every_writer(other_process, cli, tmp_path, tiny_args):
    out = written_run(tmp_path / "run", tiny_args)
    (out / LOCK).write_text(lock_of(other_process))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for argv in (tiny_args(out, "resume=true"), tiny_args(out, "overwrite=true"), ["export", f"run={out}"],
                 ["eval", f"run={out}"], ["publish", f"run={out}", "hub.repo_id=a/b"]):
        result = cli(*argv)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (argv, result.stderr[-2000:])
        assert f"{out} is being written by another process (PID {other_process} on " in result.stderr, argv
        assert f"If no such process is running, delete {out / LOCK}" in result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_a_finished_run_holds_none(cli, tmp_path, tiny_args):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK).write_text(lock_of(pid))  # a run killed with -9 before it wrote anything else
    result = cli(*tiny_args(out, "overwrite=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Taking over {out / LOCK}: the process that held it" in result.stderr and f'"pid": {pid}' in result.stderr
    assert not (out / LOCK).exists() and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_same_command(cli, tmp_path, tiny_args, monkeypatch):
    """Stopped during the base evaluation (a signal; a model or adapter error stops it at the same point)."""
    import finetune.pipeline as pipeline

    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "measure_base", interrupted)
        assert cli(*tiny_args(out)).returncode == 130
    assert (out / "config.yaml").is_file() and not (out / LOCK).exists()
    result = cli(*tiny_args(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"output_dir={out} holds a run that stopped before its first checkpoint" in result.stderr
    assert (out / "summary.json").is_file()


def test_resume_of_a_failed_start_starts_it_over(tmp_path, tiny_args):
    from finetune.registry import load_config
    from finetune.run import Run

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("written by a start that stopped before its first checkpoint\n")
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 7.0}\n')
    (out / "checkpoints").mkdir()
    assert Run.check_new(load_config(tiny_args(out, "resume=true"))) == (out, None)


def test_a_folder_with_files_of_its_own_is_never_started_over(cli, tmp_path, tiny_args):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "notes.txt").write_text("mine")
    result = cli(*tiny_args(out))
    assert result.returncode == 2 and f"output_dir={out} already holds a run" in result.stderr
    assert sorted(os.listdir(out)) == ["config.yaml", "notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_gpu_recipe_on_a_cpu_is_refused_with_the_plans_hours(cli, tmp_path):
    from tests.helpers import ROOT

    out = tmp_path / "run"
    result = cli("recipe=qlora_llama7b", f"data.path={ROOT / 'finetune/assets/demo_data/train.jsonl'}",
                 f"output_dir={out}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = result.stderr.split("error: ", 1)[1]
    assert said.startswith("No CUDA GPU was found, and meta-llama/Llama-2-7b-hf (6.7B parameters) would train here "
                           "for at least ") and "train.allow_cpu=true" in said and "plan.gpu=rtx3060" in said
    assert float(said.split("at least ")[1].split(" hours")[0].replace(",", "")) > 100
    assert not out.exists()


@pytest.mark.slow
def test_allow_cpu_trains_what_the_estimate_would_refuse(cli, tmp_path, tiny_args, monkeypatch):
    import finetune.plan

    for name, value in (("cpu_flops", lambda: 1e3), ("FASTEST_CPU_FLOPS", 1e3)):  # the tiny run would take hours
        monkeypatch.setattr(finetune.plan, name, value)
    refused = cli(*tiny_args(tmp_path / "a"))
    assert refused.returncode == 2 and "would train here for at least" in refused.stderr
    result = cli(*tiny_args(tmp_path / "b", "train.allow_cpu=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()
