"""What a run trusts: no pickle weights unless allowed, remote code only with a warning, no unsafe torch.load."""

import ast
import logging
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


def unsafe_loads(source: str) -> list[str]:
    """The calls in Python source that can run code from a file they read: pickle/dill/joblib/cloudpickle loads,
    numpy.load(allow_pickle=True), and torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") and name.endswith((".load", ".loads")):
            found.append(ast.unparse(node))
        elif name == "torch.load" and keywords.get("weights_only") != "True":
            found.append(ast.unparse(node))
        elif name in ("np.load", "numpy.load") and keywords.get("allow_pickle") == "True":
            found.append(ast.unparse(node))
    return found


def test_the_scan_for_unsafe_loads_finds_them():
    assert unsafe_loads("import torch\nstate = torch.load(path)\n") == ["torch.load(path)"]
    assert unsafe_loads("torch.load(path, weights_only=False)") == ["torch.load(path, weights_only=False)"]
    assert unsafe_loads("pickle.loads(blob)\nnp.load(f, allow_pickle=True)") == ["pickle.loads(blob)",
                                                                                 "np.load(f, allow_pickle=True)"]
    assert unsafe_loads("torch.load(path, map_location='cpu', weights_only=True)\njson.load(f)") == []


def test_no_code_of_ours_loads_a_file_that_can_run_code():
    """The package and its scripts: weights come from safetensors (pickle only with model.allow_pickle, through
    transformers), and any torch.load is weights_only."""
    root = Path(__file__).resolve().parents[2]
    files = sorted([*(root / "finetune").rglob("*.py"), *(root / "scripts").glob("*.py")])
    assert len(files) > 20  # the scan sees the code
    found = {str(p.relative_to(root)): unsafe_loads(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
