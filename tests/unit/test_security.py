"""What a run trusts: no pickle weights unless allowed, remote code only with a warning, no unsafe torch.load."""

import logging
import re
from pathlib import Path

import pytest
import torch

from finetune.config import ModelConfig, QuantConfig
from finetune.errors import UserError
from finetune.model import Device, load_base_model
from finetune.tokenizer import warn_remote_code

CPU = Device("cpu", "cpu", True, "fp32", torch.float32)


@pytest.fixture(scope="module")
def pickle_model(tiny_model, tmp_path_factory):
    """The tiny model with its weights as pytorch_model.bin (pickle) only."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("pickle_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickle_weights_load_only_when_allowed(pickle_model):
    with pytest.raises(UserError, match=r"has only pickle \(.bin\) weights, which can run code when loaded"):
        load_base_model(ModelConfig(name_or_path=str(pickle_model)), QuantConfig(method="none", double_quant=False), CPU)
    model = load_base_model(ModelConfig(name_or_path=str(pickle_model), allow_pickle=True),
                            QuantConfig(method="none", double_quant=False), CPU)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_safetensors_models_load_by_default(tiny_model):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model)), QuantConfig(method="none", double_quant=False), CPU)
    assert model.config.model_type == "llama"


def test_remote_code_is_off_by_default_and_warned_about_when_on(caplog):
    assert ModelConfig(name_or_path="x").trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="finetune"):
        warn_remote_code(ModelConfig(name_or_path="some/repo"))
        assert not caplog.records
        warn_remote_code(ModelConfig(name_or_path="some/repo", trust_remote_code=True))
    assert "model.trust_remote_code=true: the Python code shipped with some/repo will run" in caplog.text


def test_every_torch_load_of_ours_is_weights_only():
    package = Path(__file__).resolve().parents[2] / "finetune"
    calls = [(p.name, m.group(0)) for p in package.rglob("*.py")
             for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert all("weights_only=True" in call for _, call in calls), calls
