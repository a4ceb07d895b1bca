"""A run on a tiny model whose tokenizer carries Llama 3.1's real chat template (TRL's copy): the end-of-turn token
becomes the EOS everywhere it is used, and `eval` measures the labels training measured."""

import json

import pytest

from tests.helpers import build_tiny_model, chat_template, run_main, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama3_run(chat_data, tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("llama3_model"), template=chat_template("llama3_1"))
    out = tmp_path_factory.mktemp("llama3") / "run"
    # 5 eval rows in one batch: the Trainer's eval loss (a mean of batch means) is then token-weighted, as eval's is
    result = run_main(*tiny_overrides(model, chat_data, out, "train.max_steps=6", "train.eval_batch_size=16"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_eval_measures_the_loss_training_measured(llama3_run):
    result = run_main("eval", f"run={llama3_run}", "eval.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((llama3_run / "summary.json").read_text())["eval_loss"]
    rows = json.loads((llama3_run / "eval.json").read_text())["rows"]
    as_trained = next(r for r in rows if r["label"] == "nf4")
    assert as_trained["loss_tokens"] > 0 and as_trained["loss"] == pytest.approx(trained, rel=1e-3)
    base = next(r for r in rows if not r["adapter"])
    assert base["loss"] > as_trained["loss"]  # six steps of training are measured, not a 0.0000


def test_the_end_of_turn_token_is_the_eos_of_every_export(llama3_run):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(llama3_run / "adapter")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token != "<|eot_id|>"
    eos = GenerationConfig.from_pretrained(llama3_run / "adapter").eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])
    summary = json.loads((llama3_run / "summary.json").read_text())
    assert summary["chat_template"] == "tokenizer" and summary["reasoning"] is False


def test_generate_formats_the_prompt_as_training_did(llama3_run, monkeypatch):
    """generate builds the prompt with finetune.data.masks.inference_prompt, the context training gave replies."""
    from finetune.data import masks

    prompts = []
    real = masks.inference_prompt
    monkeypatch.setattr(masks, "inference_prompt", lambda *a, **k: prompts.append(real(*a, **k)) or prompts[-1])
    result = run_main("generate", f"run={llama3_run}", "prompt=What is 3 times 7 modulo 100?", "max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert prompts == ["<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                       "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                       "What is 3 times 7 modulo 100?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]
    assert "[4 tokens, cut at max_new_tokens=4]" in result.stdout or "stopped at EOS" in result.stdout
