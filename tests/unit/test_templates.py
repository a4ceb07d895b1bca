"""Bundled chat templates: the exact text, and exactly which tokens are trained, worked out by hand."""

import pytest
from transformers import AutoTokenizer

from finetune.data.templates import TEMPLATES, apply_chat_template_choice
from finetune.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]

# template -> (the whole rendered conversation, the trained spans, what follows the last reply)
EXPECTED = {
    "plain": (
        "<s>Be brief.\n\n### User:\nHi\n\n### Assistant:\nHello!</s>\n\n### User:\nBye\n\n### Assistant:\nSee you.</s>\n\n",
        ["Hello!</s>", "See you.</s>"], "\n\n"),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you.<|im_end|>\n",
        ["Hello!<|im_end|>", "See you.<|im_end|>"], "\n"),
    "llama2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] See you. </s>",
        [" Hello! </s>", " See you. </s>"], ""),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "See you.<|eot_id|>",
        ["Hello!<|eot_id|>", "See you.<|eot_id|>"], ""),
    "mistral": (
        "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]See you.</s>",
        ["Hello!</s>", "See you.</s>"], ""),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.pad_token = "<unk>"
    return tok


def trained_spans(tok, ids, mask):
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_every_bundled_template_is_worked_out_here():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_text_and_trained_tokens(tokenizer, name):
    text, spans, tail = EXPECTED[name]
    assert apply_chat_template_choice(tokenizer, name) == name
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    got = trained_spans(tokenizer, ids, mask)
    # exactly the replies and their end-of-turn token are trained, token for token
    assert [tokenizer.decode(s) for s in got] == spans
    assert [s[-1] for s in got] == [tokenizer.eos_token_id] * 2  # the reply ends on the token generation stops at
    assert sum(mask) == sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in spans)
    assert ids[:2].count(tokenizer.bos_token_id) <= 1  # no doubled BOS
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # inference prompts are formatted exactly as training: prompt + reply (+ separator) == the training text
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False)
    assert text.startswith(prompt)
    assert text[len(prompt):] == spans[-1] + tail


def test_a_template_whose_end_of_turn_token_is_not_eos_becomes_the_eos(tokenizer):
    apply_chat_template_choice(tokenizer, "llama3")
    assert tokenizer.eos_token == "<|eot_id|>"
    apply_chat_template_choice(tokenizer, "chatml")
    assert tokenizer.eos_token == "<|im_end|>"


def test_templates_that_need_missing_tokens_are_refused(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for name, missing in (("chatml", "<|im_start|>, <|im_end|>"), ("llama3", "<|start_header_id|>")):
        with pytest.raises(UserError, match=f"data.chat_template={name} needs the tokens {missing}"):
            apply_chat_template_choice(tok, name)
    with pytest.raises(UserError, match="Did you mean 'llama3'"):
        apply_chat_template_choice(tok, "lama3")


def test_the_tokenizer_s_own_template_is_kept(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert apply_chat_template_choice(tokenizer, None) == "tokenizer"
    assert tokenizer.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_named_template_variants_are_chosen_by_name(tokenizer):
    """Tokenizers with several named templates (Hermes-3, Command-R): 'default' unless data.chat_template names one."""
    from finetune.data.tokenize import _key
    from finetune.config import DataConfig

    variants = {"default": TEMPLATES["plain"].jinja, "tool_use": TEMPLATES["mistral"].jinja}
    tokenizer.chat_template = dict(variants)
    assert apply_chat_template_choice(tokenizer, None) == "tokenizer (default)"
    assert tokenizer.chat_template == variants["default"]
    tokenizer.chat_template = dict(variants)
    assert apply_chat_template_choice(tokenizer, "tool_use") == "tokenizer (tool_use)"
    assert tokenizer.chat_template == variants["tool_use"]
    tokenizer.chat_template = dict(variants)
    with pytest.raises(UserError, match="not a bundled template: choose one of plain, .*; the tokenizer's own: default, "
                                        "tool_use.*Did you mean 'tool_use'"):
        apply_chat_template_choice(tokenizer, "tool_us")
    import datasets

    assert len(_key(datasets.Dataset.from_list([{"text": "a"}]), tokenizer, DataConfig(path="x"), "train")) == 24
