"""Preference pairs (train.objective=dpo): formats, their checks, their tokens, the settings DPO refuses, its plan."""

import json
import math

import pytest

from finetune.config import DataConfig
from finetune.data import load_splits
from finetune.data.formats import EXAMPLES
from finetune.errors import UserError
from finetune.registry import load_config

USER = [{"role": "user", "content": "Write 947 in words."}]
DIGITS, WORDS = {"role": "assistant", "content": "947"}, {"role": "assistant", "content": "nine hundred forty seven"}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def splits_of(path: str, **data):
    return load_splits(DataConfig(path=path, eval_fraction=0.0, **data), 0)


def test_both_preference_formats_are_detected_read_and_converted(tmp_path):
    """Text pairs; conversations with the prompt given, without it (shared by both sides), and UltraFeedback's
    (whole conversations plus the prompt again as text): each read as the prompt's messages and one answer a side."""
    text = splits_of(write(tmp_path / "text.jsonl", [json.loads(EXAMPLES["preference"])] * 2))
    assert text.format == "preference" and text.preference and not text.chat
    rows = [{"prompt": USER, "chosen": [DIGITS], "rejected": [WORDS]},
            {"chosen": USER + [DIGITS], "rejected": USER + [WORDS]},
            {"prompt": USER[0]["content"], "chosen": USER + [DIGITS], "rejected": USER + [WORDS], "score": 8}]
    chat = splits_of(write(tmp_path / "chat.jsonl", rows))
    assert chat.format == "preference_chat" and chat.chat and chat.preference
    for row in chat.train:
        assert [m["content"] for m in row["prompt"]] == [USER[0]["content"]]
        assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ("947", WORDS["content"])


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q", "chosen": "same", "rejected": " same "}, "the same 'chosen' and 'rejected' text"),
    ({"prompt": "Q", "chosen": "", "rejected": "no"}, "field 'chosen' is empty"),
    ({"prompt": USER, "chosen": [DIGITS], "rejected": [dict(DIGITS)]}, "the same 'chosen' and 'rejected' answer"),
    ({"prompt": USER, "chosen": [DIGITS], "rejected": [{"role": "assistant", "content": " "}]},
     "rejected[0] (assistant) has empty"),
    ({"chosen": USER + [DIGITS], "rejected": [{"role": "user", "content": "Other?"}, WORDS]},
     "'chosen' and 'rejected' differ at message 0, before their last one"),
    ({"prompt": USER, "chosen": [DIGITS, WORDS], "rejected": [WORDS]}, "field 'chosen' has 2 messages"),
    ({"prompt": USER + [WORDS], "chosen": [DIGITS], "rejected": [WORDS]}, "the prompt's last message is 'assistant'"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "947"}], "rejected": [WORDS]},
     "the 'chosen' answer has role 'user'"),
])
def test_a_bad_pair_is_named_by_file_and_line_or_dropped_and_counted(tmp_path, row, reason):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"} if isinstance(row["chosen"], str) else \
        {"prompt": USER, "chosen": [DIGITS], "rejected": [WORDS]}
    path = write(tmp_path / "pairs.jsonl", [good, row, good])
    with pytest.raises(UserError) as e:
        splits_of(path)
    assert f"{path}:2: the row " in str(e.value) and reason in str(e.value) and "data.bad_rows=drop" in str(e.value)
    kept = splits_of(path, bad_rows="drop")
    assert len(kept.train) == 2 and sum(kept.dropped.values()) == 1


def test_a_pair_scores_each_answer_and_its_end_of_turn_after_the_prompt_inference_gives(tiny_model):
    """The prompt's tokens are the template's generation prompt (what `generate` feeds the model); each completion is
    the answer and the end-of-turn token, and nothing after it (the template's newline is not compared)."""
    from transformers import AutoTokenizer

    from finetune.data.masks import inference_prompt
    from finetune.data.pairs import pair_row
    from finetune.data.templates import apply_chat_template_choice, use_end_of_turn

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    apply_chat_template_choice(tokenizer, "plain")
    use_end_of_turn(tokenizer)
    pair = pair_row({"prompt": USER, "chosen": [DIGITS], "rejected": [WORDS]}, tokenizer)
    prompt = tokenizer(inference_prompt(tokenizer, USER), add_special_tokens=False)["input_ids"]
    assert pair["prompt_ids"] == prompt
    assert tokenizer.decode(pair["chosen_ids"]) == "947</s>"
    assert tokenizer.decode(pair["rejected_ids"]) == "nine hundred forty seven</s>"
    assert pair["length"] == len(prompt) + len(pair["rejected_ids"])
    text = pair_row({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, tokenizer)
    assert tokenizer.decode(text["prompt_ids"] + text["chosen_ids"]) == "Q: yes" + tokenizer.eos_token
    assert tokenizer.decode(text["rejected_ids"]).endswith(" no" + tokenizer.eos_token)


def test_preference_data_needs_dpo_and_dpo_needs_preference_data(tmp_path, tiny_args):
    """One message each way, before a model is loaded or a run directory written."""
    import finetune.pipeline as pipeline

    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": USER, "chosen": [DIGITS], "rejected": [WORDS]}] * 4)
    with pytest.raises(UserError, match=r"holds preference pairs \(preference_chat.*set train.objective=dpo"):
        pipeline.prepare(load_config(tiny_args(tmp_path / "a", f"data.path={pairs}")))
    with pytest.raises(UserError, match=r"train.objective=dpo learns from preference pairs, but data.path=.* is in "
                                        r"the messages format"):
        pipeline.prepare(load_config(tiny_args(tmp_path / "b", "train.objective=dpo")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dpo_refuses_the_settings_it_would_ignore():
    with pytest.raises(UserError) as e:
        load_config(["train.objective=dpo", "data.packing=true", "data.train_on_inputs=true"])
    assert "data.packing=true is for supervised fine-tuning" in str(e.value)
    assert "data.train_on_inputs=true is for supervised fine-tuning" in str(e.value)
    with pytest.raises(UserError, match="train.sft_weight=1 weighs a cross-entropy term of the DPO loss"):
        load_config(["train.sft_weight=1"])
    with pytest.raises(UserError, match="init_from continues a run's LoRA adapter, and lora.enabled=false"):
        load_config(["init_from=x", "lora=off", "quant=none"])


def test_init_from_takes_the_adapter_only_onto_its_own_base(tmp_path):
    """The shipped SFT demo run continues on the bundled model, wherever it is installed; another base is refused."""
    from finetune.lora import initial_adapter

    cfg = load_config(["recipe=dpo_tiny", "lora.r=8"])
    assert initial_adapter(cfg).joinpath("adapter_config.json").is_file() and cfg.lora.r == 32
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="an adapter only fits the base it was trained on"):
        initial_adapter(load_config(["recipe=dpo_tiny", f"model.name_or_path={tmp_path}"]))


def test_plan_holds_both_answers_of_a_pair_and_adds_the_reference_forward():
    """At the same micro-batch a DPO step holds twice the activations of an SFT step (chosen and rejected follow the
    prompt), and each token costs one more forward: the reference, 2N FLOPs plus its attention."""
    from finetune.plan import load_arch, make_plan, matmul_params, setting_of

    common = ["recipe=qlora_llama3_1_8b", "data.max_length=1024", "train.max_steps=100"]
    sft, dpo = (make_plan(load_config(common + extra), "a100-80gb") for extra in ([], ["train.objective=dpo"]))

    def activations(plan):
        return next(v for k, v in plan["memory_gib"].items() if k.startswith("activations"))

    assert activations(dpo) == pytest.approx(2 * activations(sft))
    cfg = load_config(common)
    arch = load_arch(cfg.model, cfg.lora)
    s = setting_of(cfg, arch)
    extra = 2 * matmul_params(arch) + 2 * arch.layers * s.max_length * arch.hidden
    assert dpo["flops_per_token"] - sft["flops_per_token"] == pytest.approx(extra)
    assert dpo["train_tokens"] == 2 * sft["train_tokens"]
    assert dpo["hours"] / sft["hours"] == pytest.approx(2 * dpo["flops_per_token"] / sft["flops_per_token"], rel=0.02)
    assert math.isfinite(dpo["peak_gib"]) and dpo["peak_gib"] > sft["peak_gib"]


def test_the_data_verb_previews_a_pair_with_the_compared_tokens_marked(cli):
    """Both sides of the first training pair: the prompt as the template renders it, each answer and its end-of-turn
    token marked; the counts are of pairs, their trained tokens both answers'."""
    result = cli("data", "recipe=dpo_tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "format: preference_chat" in out and "train: 180 rows" in out and "eval: 30 rows" in out
    prompt = "<s><|user|>\nWrite 664 in words.</s>\n<|assistant|>\n"
    assert f"chosen:\n{prompt}[[six hundred sixty four</s>]]\n" in out and f"rejected:\n{prompt}[[664</s>]]\n" in out


def test_dpo_training_every_weight_under_fsdp_is_refused_for_want_of_room_for_its_reference():
    """TRL would load an unsharded second copy of the model in every process; in one process or under DDP the model
    computes its own reference before its first step, and LoRA needs no copy at all."""
    from finetune import distributed
    from finetune.distributed import World

    full = load_config(["train.objective=dpo", "lora=off", "quant=none", "train.optim=adamw_torch", "export=adapter"])
    with pytest.raises(UserError, match="train.objective=dpo with lora.enabled=false under FSDP has no room for its "
                                        "reference"):
        distributed.check_launch(full, World(2, 0, 0, "fsdp"), "cuda")
    distributed.check_launch(full, World(2, 0, 0, "ddp"), "cuda")
    distributed.check_launch(load_config(["train.objective=dpo", "train.optim=adamw_torch"]), World(2, 0, 0, "fsdp"),
                             "cuda")
