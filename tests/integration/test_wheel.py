"""`pip install .` (not editable) ships configs/, recipes/ and the demo assets: the CLI works from any directory."""

import os
import site
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_the_installed_wheel_reads_its_recipes_data_and_model_from_another_directory(tmp_path):
    """The installed wheel (not this checkout) composes a recipe, reads and tokenizes the demo data with the demo
    tokenizer (`data` verb) in a directory of its own, and the demo model it ships loads in plain transformers. The
    training code is the checkout's own, tested everywhere else: this is about what the wheel carries."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("finetune-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no site hooks, so an editable install of this checkout cannot shadow the wheel; the other
    # dependencies come from this interpreter's site-packages, after the wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()]),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run([sys.executable, "-S", "-m", "finetune", "data", "recipe=tiny_qlora", "data.max_samples=64"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(target) in result.stdout + result.stderr  # the tokenizer and data came from the wheel
    assert "trained tokens" in result.stdout + result.stderr and list(cwd.iterdir()) == []
    from transformers import AutoModelForCausalLM

    shipped = target / "finetune" / "assets" / "tiny_llama"
    assert AutoModelForCausalLM.from_pretrained(shipped).num_parameters() > 0
    assert (target / "finetune" / "model_card.md").is_file() and (target / "finetune" / "recipes" / "qlora_llama7b.yaml").is_file()
