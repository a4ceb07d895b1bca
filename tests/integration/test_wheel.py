"""`pip install .` (not editable) ships configs/, recipes/ and the demo assets: the CLI works from any directory."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_the_installed_wheel_reads_its_recipes_data_and_model_from_another_directory(tmp_path):
    """The installed wheel (not this checkout) composes a recipe in a directory of its own, and every path it resolves
    (the demo model, tokenizer and data) lies in the wheel and loads; the wheel carries every module, config, recipe
    and asset of the checkout. The code itself is the checkout's, tested everywhere else: this is about what the
    wheel carries and how it finds it."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("finetune-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    shipped = {p.relative_to(target / "finetune") for p in (target / "finetune").rglob("*") if p.is_file()}
    ours = {p.relative_to(ROOT / "finetune") for p in (ROOT / "finetune").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    ours |= {p.relative_to(ROOT) for folder in ("configs", "recipes") for p in (ROOT / folder).rglob("*.yaml")}
    assert ours <= shipped, sorted(map(str, ours - shipped))[:10]
    # -S: no site hooks, so an editable install of this checkout cannot shadow the wheel; the other
    # dependencies come from this interpreter's site-packages, after the wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()]), "HF_HUB_OFFLINE": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run([sys.executable, "-S", "-m", "finetune", "recipe=tiny_qlora", "--cfg", "job", "--resolve"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    paths = [cfg["model"]["name_or_path"], cfg["data"]["path"], cfg["data"]["eval_path"]]
    assert all(Path(p).is_relative_to(target / "finetune") and Path(p).exists() for p in paths), paths
    assert list(cwd.iterdir()) == []
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    rows = [json.loads(line) for line in Path(paths[1]).read_text().splitlines()]
    assert len(rows) == 900 and tokenizer.apply_chat_template(rows[0]["messages"], tokenize=True)
    assert AutoModelForCausalLM.from_pretrained(paths[0]).num_parameters() > 0
