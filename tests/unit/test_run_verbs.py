"""The pieces of export / generate / eval / publish that need no model: arguments, warnings, checks, layout."""

import json
from types import SimpleNamespace

import pytest

from finetune.errors import UserError
from finetune.export import adapter_warnings, fidelity
from finetune.model import eos_token_ids
from finetune.scoring import mean_loss
from finetune.generate import read_prompts, side_by_side
from finetune.registry import load_config
from finetune.run import Run
from finetune.verb_args import GenerateArgs, parse_verb_args


def problems(*overrides):
    with pytest.raises(UserError) as e:
        load_config(list(overrides))
    return str(e.value)


def test_new_cross_field_problems_are_reported_together():
    text = problems("quant=int8", "quant.double_quant=false", "export=adapter", "export.merge_base=dequantized",
                    "tracking=none", "tracking.log_model=true",
                    "hub.push=true", "hub.model=merged")
    assert "export.merge_base=dequantized merges into the 4-bit base as trained, but quant=int8" in text
    assert "tracking.log_model=true logs the adapter to W&B, but tracking.backend is none" in text
    assert "hub.push=true needs hub.repo_id=USER/NAME" in text
    assert "hub.model=merged publishes merged/, which export.merge=false does not write" in text
    assert "hub.repo_id=justaname is not USER/NAME" in problems("hub.repo_id=justaname")


def test_hub_and_export_groups_compose():
    cfg = load_config(["hub=push", "hub.repo_id=me/model", "export=merged"])
    assert cfg.hub.push and cfg.hub.private and cfg.hub.model == "adapter"
    assert (cfg.export.merge, cfg.export.merge_base, cfg.export.device) == (True, "auto", "cpu")


def lora(**kw):
    base = dict(r=16, modules_to_save=[], use_dora=False)
    return SimpleNamespace(model=SimpleNamespace(hub_id=None, name_or_path="meta-llama/Llama-2-7b-hf"),
                           lora=SimpleNamespace(**(base | kw)))


@pytest.mark.parametrize("kw, expected", [
    ({}, []),
    ({"r": 12}, ["lora.r=12 is not one of vLLM's ranks (1, 8, 16, 32, 64, 128, 256, 320, 512): serve it with --max-lora-rank 16"]),
    ({"r": 1024}, ["lora.r=1024: vLLM serves adapters up to rank 512"]),
    ({"modules_to_save": ["lm_head"]}, ["lora.modules_to_save=['lm_head']: vLLM cannot load adapters that save whole modules"]),
    ({"use_dora": True}, ["lora.use_dora=true: vLLM cannot serve DoRA adapters"]),
])
def test_vllm_warnings(kw, expected):
    warnings = adapter_warnings(lora(**kw))
    assert len(warnings) == len(expected) and all(w.startswith(e) for w, e in zip(warnings, expected))


def test_a_local_base_warns_unless_its_hub_id_is_given(tmp_path):
    cfg = lora()
    cfg.model.name_or_path = str(tmp_path)
    assert "what `publish` uploads names no base model" in adapter_warnings(cfg)[0]
    cfg.model.hub_id = "org/base"
    assert adapter_warnings(cfg) == []


def test_eos_ids_put_the_templates_end_of_turn_first():
    tok = SimpleNamespace(eos_token_id=128009)  # <|eot_id|>, made EOS by the llama3 template
    assert eos_token_ids(tok, SimpleNamespace(eos_token_id=128001)) == [128009, 128001]
    assert eos_token_ids(tok, SimpleNamespace(eos_token_id=[128001, 128009])) == [128009, 128001]
    assert eos_token_ids(tok, None) == [128009]


def test_fidelity_figures():
    import torch

    torch.manual_seed(0)
    ref = [torch.randn(1, 5, 11)]
    samples = [{"labels": torch.tensor([[-100, -100, 3, 4, 5]])}]
    same = fidelity(ref, [ref[0].clone()], samples)
    assert same["mean_kl"] == pytest.approx(0, abs=1e-6) and same["max_abs_logit_diff"] == 0
    other = fidelity(ref, [ref[0] + torch.randn(1, 5, 11)], samples)
    assert other["mean_kl"] > 0.01 and other["max_abs_logit_diff"] > 0.1
    # loss over the labelled tokens only: positions 1..3 predict tokens 3, 4, 5
    logp = ref[0].log_softmax(-1)[0]
    expected = -(logp[1, 3] + logp[2, 4] + logp[3, 5]) / 3
    assert mean_loss(ref, samples) == pytest.approx(expected.item(), rel=1e-5)


def test_verb_arguments_parse_and_check():
    args, overrides = parse_verb_args("generate", ["run=r", "prompt=a=b: c, d", "max_new_tokens=5", "do_sample=true",
                                                   "quant=null"])
    assert (args.prompt, args.max_new_tokens, args.do_sample, args.quant) == ("a=b: c, d", 5, True, None)
    assert overrides == []
    args, overrides = parse_verb_args("export", ["run=r", "checkpoint=last", "export.merge_base=original"])
    assert args.checkpoint == "last" and overrides == ["export.merge_base=original"]
    with pytest.raises(UserError) as e:
        parse_verb_args("publish", ["run=r", "hub.repo=x/y", "export.merge=true", "stray"])
    text = str(e.value)
    assert "Unknown key 'hub.repo' for `publish`. Did you mean 'hub.repo_id'?" in text
    assert "Unknown key 'export.merge' for `publish`" in text and "'stray' is not key=value" in text
    with pytest.raises(UserError, match="do_sample=yes: expected true or false"):
        parse_verb_args("generate", ["run=r", "do_sample=yes"])


def test_run_overrides_are_typed_and_validated(tmp_path):
    from finetune.registry import to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config([])))
    assert Run.open(str(tmp_path), ["export.max_kl=0.5"]).cfg.export.max_kl == 0.5
    with pytest.raises(UserError, match="export.max_kl=lots"):
        Run.open(str(tmp_path), ["export.max_kl=lots"])
    with pytest.raises(UserError, match="export.merge_base=best is not allowed"):
        Run.open(str(tmp_path), ["export.merge_base=best"])
    with pytest.raises(UserError, match="checkpoint=3: .* holds no checkpoints"):
        Run.open(str(tmp_path)).checkpoint_dir("3")


def test_prompts_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    convs = read_prompts(GenerateArgs(run="r", prompts_file=str(txt), system="Be brief."))
    assert convs == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "second"}]]
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{broken\n")
    with pytest.raises(UserError, match=r"p.jsonl, line 2: not valid JSON"):
        read_prompts(GenerateArgs(run="r", prompts_file=str(bad)))
    bad.write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(UserError, match=r'line 1: expected an object with a "prompt" string'):
        read_prompts(GenerateArgs(run="r", prompts_file=str(bad)))


def test_side_by_side_wraps_both_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    out = side_by_side("short", "a much longer answer " * 4).splitlines()
    assert out[0].split() == ["base", "|", "tuned"] and len(out) > 3
    assert all(len(line.split(" | ")[0]) == 33 for line in out if " | " in line)


def test_modules_to_save_only_when_asked():
    from finetune.config import LoraConfig
    from finetune.lora import build_peft_config

    assert build_peft_config(LoraConfig()).modules_to_save is None
    assert build_peft_config(LoraConfig(modules_to_save=["lm_head"])).modules_to_save == ["lm_head"]


def test_model_card_of_a_hub_base_and_dataset():
    from finetune.card import render

    cfg = load_config(["recipe=qlora_llama7b", "hub.license=llama2"])
    summary = {"eval_loss_base": 1.61, "eval_loss": 1.23, "steps": 1000, "wandb_url": "https://wandb.ai/me/finetune/runs/abc",
               "merge_fidelity": None}
    card = render(cfg, summary, merged=False, repo_id="me/llama7b-chat")
    data = card.data
    assert data.base_model == "meta-llama/Llama-2-7b-hf" and data.library_name == "peft" and data.license == "llama2"
    assert data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert "base_model:adapter:meta-llama/Llama-2-7b-hf" in data.tags and "qlora" in data.tags
    assert "| eval loss, base | 1.61 |" in card.text and "| eval loss, tuned | 1.23 |" in card.text
    assert "https://wandb.ai/me/finetune/runs/abc" in card.text and "recipe `qlora_llama7b`" in card.text
    assert 'PeftModel.from_pretrained(base, "me/llama7b-chat")' in card.text
    merged = render(cfg, summary, merged=True, repo_id="me/llama7b-merged").data
    assert merged.library_name == "transformers" and not any(t.startswith("base_model:adapter") for t in merged.tags)


def test_summary_json_is_always_valid_json_and_merges(tmp_path):
    """NaN or infinity (a figure that could not be measured) is written as null; a later write merges."""
    from finetune.registry import to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config([])))
    run = Run.open(str(tmp_path))
    run.write_summary({"eval_loss": float("nan"), "figures": {"kl": float("inf")}, "steps": 3}, replace=True)
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json")) == {
        "eval_loss": None, "figures": {"kl": None}, "steps": 3}
    run.write_summary({"eval": {"rows": 2}})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"eval_loss": None, "figures": {"kl": None},
                                                                   "steps": 3, "eval": {"rows": 2}}


def test_a_loss_over_zero_tokens_is_an_error_not_a_figure():
    import torch

    with pytest.raises(UserError, match="A loss over zero trained tokens is not a figure"):
        mean_loss([torch.zeros(1, 3, 5)], [{"labels": torch.tensor([[-100, -100, -100]])}])
