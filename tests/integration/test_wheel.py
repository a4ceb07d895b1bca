"""`pip install .` (not editable) ships configs/, recipes/ and the demo assets: the CLI works from any directory."""

import os
import site
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_the_installed_wheel_trains_from_another_directory(tmp_path):
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
    out = tmp_path / "x"
    result = subprocess.run(
        [sys.executable, "-S", "-m", "finetune", "recipe=tiny_qlora", f"output_dir={out}", "train.max_steps=3",
         "eval.exact_match_samples=0", "export=adapter", "tracking=none", "data.max_samples=64", "data.eval_max_samples=8"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert str(target) in (out / "config.yaml").read_text()  # the model and data came from the wheel
    assert list(cwd.iterdir()) == []
