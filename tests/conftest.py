"""Fixtures: the tiny model and data, the CLI in this process, the one shared tiny run, and the demo run.

Tiers: `pytest -m "not slow"` (config, data, templates, plan, errors: no training) and the whole suite.
Training runs and subprocesses are marked slow. Runs happen in this process wherever a second interpreter
is not the point of the test (importing torch, transformers, peft and TRL costs ~12 s per process here).
"""

import atexit
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.helpers import build_tiny_model, effective_base_weights, run_main, tiny_overrides, too_slow, write_chat_data

# No test sees the developer's Hub login or token. Set before any test module imports huggingface_hub, which
# reads HF_HOME once; subprocesses inherit it.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-hf-home-")
os.environ.pop("HF_TOKEN", None)
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)

# transformers' log handler keeps the stderr of the moment it is first configured. Configured inside a test, that
# is the test's captured stream, which pytest closes afterwards, and a later warning prints "--- Logging error ---"
# with a traceback. Configured now, it writes to the session's capture.
import transformers.utils.logging  # noqa: E402  (after HF_HOME is set: huggingface_hub reads it on import)

transformers.utils.logging.get_logger("transformers")

DEMO_STEPS = 20  # a shortened demo: enough for the loss to fall and the replies to end (it levels off by step 20)
DEMO_SAVE = DEMO_STEPS // 2  # a checkpoint half way, and one at the end
TINY_RUN_STEPS = 16  # the shared tiny run: 91 training rows / micro-batch 8 = 12 steps per epoch, 13-16 in the second


def pytest_collection_finish(session):
    """Import the training stack once and move everything alive to the garbage collector's permanent generation: the
    Trainer calls gc.collect() after every training run (accelerate's free_memory), and in a test session holding
    torch, transformers, TRL and every collected test each call walked all of it (0.3 s a run here)."""
    import functools
    import gc

    import peft  # noqa: F401
    import trl.trainer.sft_trainer  # noqa: F401

    import finetune.model

    gc.freeze()
    # Every CPU training run first measures how busy the other processes keep the CPU (finetune.model.fit_cpu_threads),
    # over 0.2 s; the test session is alone on the machine, so its ~90 runs measure over 0.05 s (still 5 ticks a core:
    # tests/unit/test_cpu_threads.py finds busy cores with it, and checks the 0.2 s default directly).
    finetune.model.others_busy_cpus = functools.partial(finetune.model.others_busy_cpus, window=0.05)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A subprocess that ran past its timeout is one line saying so, not a traceback (tests/helpers.py too_slow)."""
    outcome = yield
    if call.excinfo is not None and call.excinfo.errisinstance(subprocess.TimeoutExpired):
        outcome.get_result().longrepr = too_slow(call.excinfo.value)


def pytest_collection_modifyitems(items):
    """A test that needs a training run (the demo's or the shared tiny one) is slow, wherever it lives."""
    for item in items:
        if {"demo_run", "tiny_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", 96)


@pytest.fixture(scope="session", autouse=True)
def tokenization_cache(tmp_path_factory):
    """A cache of tokenized data for this test session only (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["FINETUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_args(tiny_model, chat_data):
    """The one override list of a tiny run (tests/helpers.py TINY_RUN): tiny_args(out, "key=value", ...)."""
    return lambda out, *extra: tiny_overrides(tiny_model, chat_data, out, *extra)


@pytest.fixture
def cli():
    """The CLI's main() in this process (tests/helpers.py run_main): cli(*args, env=..., cwd=..., wandb_mode=...)."""
    return run_main


@pytest.fixture(scope="session")
def tiny_run(tiny_args, tmp_path_factory):
    """The one shared tiny run, in this process, holding on to the live trainer: QLoRA defaults (NF4, paged
    8-bit AdamW, checkpointing), LoRA r=32 (its 32 x 128 matrices get 8-bit optimizer states), dropout 0.1 (so
    an exact resume must restore the RNG), a checkpoint every 2 steps, merged/ exported.
    Returns (captured: trainer and the weights before training, summary, run directory)."""
    import finetune.pipeline as pipeline
    from finetune.registry import load_config

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = load_config(tiny_args(run_dir, *TINY_RUN_SHARED))
    captured = {}
    real_build = pipeline.build_trainer

    def build_and_capture(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        captured["trainer"] = trainer
        captured["before"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        captured["base_before"] = effective_base_weights(trainer.model)
        return trainer

    pipeline.build_trainer = build_and_capture
    try:
        summary = pipeline.train(cfg)
    finally:
        pipeline.build_trainer = real_build
    return captured, summary, run_dir


# what the shared run adds to TINY_RUN; a resumed run passes the same (tests/integration/test_resume.py)
TINY_RUN_SHARED = [f"train.max_steps={TINY_RUN_STEPS}", "lora.r=32", "lora.dropout=0.1", "train.learning_rate=3e-3",
                   "train.save_steps=2", "train.save_total_limit=20", "export=merged"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded tiny QLoRA recipe through the CLI, shortened; exported merged, adapter logged to W&B (offline).
    In this process: the console command itself is run in a subprocess by test_cli.py and test_wheel.py."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_main("recipe=tiny_qlora", f"output_dir={out}", f"train.max_steps={DEMO_STEPS}", f"train.save_steps={DEMO_SAVE}",
                      "eval.exact_match_samples=24", "tracking.log_model=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "train.stderr").write_text(result.stderr)
    (out.parent / "train.stdout").write_text(result.stdout)
    return out
