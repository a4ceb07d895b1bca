"""The CLI runs the embedded tiny QLoRA recipe end to end (tests/conftest.py demo_run); the run directory is
then checked with plain transformers, peft and W&B's own offline log."""

import json
import re

import pytest
import torch

from tests.conftest import DEMO_SAVE
from tests.conftest import DEMO_STEPS as STEPS
from tests.helpers import read_wandb_log, wandb_config, wandb_history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(demo_run):
    return demo_run


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


def test_the_run_directory_holds_what_design_md_lists(run):
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [f"checkpoint-{DEMO_SAVE}", f"checkpoint-{STEPS}"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (run / "adapter" / name).is_file(), name
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "generation_config.json").is_file()
    # inference formats prompts exactly as training did: the same chat template travels with both exports
    template = (run / "adapter" / "chat_template.jinja").read_text()
    assert "{% generation %}" in template and (run / "merged" / "chat_template.jinja").read_text() == template
    s = summary_of(run)
    for key in ("recipe", "base_model", "quantization", "train_loss", "eval_loss_base", "eval_loss", "train_tokens",
                "train_runtime_s", "tokens_per_second", "peak_memory_gb", "device", "trainable_params",
                "total_params", "gpu_hours"):
        assert key in s, key
    assert (s["recipe"], s["quantization"], s["device"], s["gpu_hours"]) == ("tiny_qlora", "nf4", "cpu", None)


def test_the_loss_falls(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= STEPS // 5
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    s = summary_of(run)
    assert s["eval_loss"] < 0.5 * s["eval_loss_base"]
    assert all("tokens_per_second" in r and "memory_gb" in r for r in records if "loss" in r and r["step"] > 1)


def test_the_output_is_a_line_per_log_the_warnings_that_need_action_and_what_to_try_next(run):
    out, err = (run.parent / "train.stdout").read_text(), (run.parent / "train.stderr").read_text()
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    lines = [line for line in err.splitlines() if line.startswith("[finetune] step ")]
    assert [int(line.split()[2].split("/")[0]) for line in lines] == logged
    assert all(f"/{STEPS}  loss " in line and " left" in line for line in lines)
    assert "{'loss'" not in out + err and "{'eval_loss'" not in out + err  # no raw Trainer dicts
    for noise in ("FutureWarning", "wandb: WARNING", "Paged optimizers are not supported"):
        assert noise not in err, noise
    assert not re.search(r"(^|[\r\n])\s*\d+%\|", err)  # every progress bar says what it counts
    assert "[finetune] W&B run " in err and "wandb sync" in err
    assert f"next: python -m finetune generate run={run} prompt=" in out


def test_qlora_machinery_was_really_used(run):
    s = summary_of(run)
    assert s["quantized_layers"] == {"Linear4bit": 4 * 7}
    assert s["optimizer"] == {"class": "bitsandbytes.optim.adamw.AdamW", "optim_bits": 8,
                              "is_paged": False}  # paged was asked; on a CPU bitsandbytes does not page
    assert s["gradient_checkpointing"] is True
    # the optimizer state saved in the checkpoint is really 8-bit
    state = torch.load(run / "checkpoints" / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=False)["state"]
    quantized = [v.get("__bnb_optimizer_quant_state__", v) for v in state.values()]  # how bnb saves 8-bit state
    assert quantized and all(q["state1"].dtype == q["state2"].dtype == torch.uint8 for q in quantized)


def load_base(run, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from omegaconf import OmegaConf

    base = OmegaConf.load(run / "config.yaml").model.name_or_path  # a local folder: not in adapter_config.json
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32)
    for m in model.modules():  # see finetune.model.keep_4bit_cpu_layers_differentiable
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def sample_ids(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "adapter")
    messages = [{"role": "user", "content": "Write 512 in words."}, {"role": "assistant", "content": "five hundred twelve"}]
    return tok, torch.tensor([tok.apply_chat_template(messages, return_dict=True)["input_ids"]])


@torch.no_grad()
def test_the_adapter_loads_back_with_peft_and_reproduces_the_trained_model(run):
    from peft import PeftModel

    tok, ids = sample_ids(run)
    base_logits = load_base(run, quantized=True)(ids).logits
    model = PeftModel.from_pretrained(load_base(run, quantized=True), run / "adapter").eval()
    logits = model(ids).logits
    assert (logits - base_logits).abs().max() > 1.0  # the adapter changes the model
    # the same greedy answers as the trained model gave in the run, token for token
    for ex in summary_of(run)["exact_match_examples"]:
        prompt = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True) == ex["answer"]


@torch.no_grad()
def test_the_merged_model_loads_in_plain_transformers_and_matches(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ids = sample_ids(run)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    # the model as trained: the 4-bit base with the adapter (merged/ holds the closer of the two merges)
    reference = PeftModel.from_pretrained(load_base(run, quantized=True), run / "adapter").eval()
    merged_logits, ref_logits = merged(ids).logits, reference(ids).logits
    rel = (merged_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 0.02  # merged/ is stored in bf16
    assert torch.equal(merged_logits.argmax(-1), ref_logits.argmax(-1))
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())  # never 4-bit


def test_wandb_offline_run_holds_the_config_and_the_logged_losses(run):
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_log(files[0])
    config = wandb_config(records)["finetune"]
    assert config["lora"]["r"] == 32 and config["quant"]["method"] == "nf4"
    assert config["recipe"] == "tiny_qlora" and config["output_dir"] == str(run)
    ours = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert wandb_history(records, "train/loss") == pytest.approx(ours)
    # the base before training, the evaluations during training, the tuned model after
    assert len(wandb_history(records, "eval/loss")) == 2 + STEPS // 100
    assert wandb_history(records, "eval/exact_match") == pytest.approx(
        [summary_of(run)["exact_match_base"], summary_of(run)["exact_match"]])
