import os

import pytest

from tests.helpers import build_tiny_model, write_chat_data


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
