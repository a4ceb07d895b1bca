import os

import pytest

from tests.helpers import build_tiny_model, run_cli, write_chat_data

DEMO_STEPS = 60  # a shortened demo: enough for the loss to fall and the adapter to matter, ~1 min on 2 cores


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", 96)


@pytest.fixture(scope="session", autouse=True)
def no_hugging_face_login(tmp_path_factory):
    """No test sees the developer's Hub login or token (subprocesses inherit this)."""
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ.pop("HF_TOKEN", None)


@pytest.fixture(scope="session", autouse=True)
def tokenization_cache(tmp_path_factory):
    """A cache of tokenized data for this test session only (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["FINETUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded tiny QLoRA recipe through the real CLI, shortened; exported merged, adapter logged to W&B."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("recipe=tiny_qlora", f"output_dir={out}", f"train.max_steps={DEMO_STEPS}", "train.save_steps=30",
                     "eval.exact_match_samples=24", "tracking.log_model=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "train.stderr").write_text(result.stderr)
    return out
