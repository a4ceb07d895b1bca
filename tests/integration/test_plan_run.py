"""train.auto_fit inside a real run."""

import json

from tests.helpers import run_cli


def test_auto_fit_on_a_cpu_run_says_why_it_changed_nothing(tiny_model, chat_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(f"model.name_or_path={tiny_model}", f"data.path={chat_data}", "data.eval_path=null",
                     "data.max_length=128", f"output_dir={out}", "train.max_steps=2", "eval.exact_match_samples=0",
                     "train.eval_steps=0", "tracking=none", "export=adapter", "lora.r=8", "train.micro_batch_size=4",
                     "train.auto_fit=true")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auto_fit"] == {"applied": False, "reason": "no CUDA GPU: the plan models GPU memory"}
    assert summary["micro_batch_size"] == 4 and summary["peak_memory_reserved_gb"] is None
