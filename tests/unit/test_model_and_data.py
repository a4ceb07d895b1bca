"""Quantization config, pad token, chat template and data checks: no training."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from finetune.config import DataConfig, ModelConfig, QuantConfig
from finetune.data import load_splits
from finetune.data.templates import TEMPLATES, apply_chat_template_choice
from finetune.errors import UserError
from finetune.model import quantization_config
from finetune.tokenizer import check_model_path, ensure_pad_token


def test_nf4_sets_every_qlora_field_explicitly():
    q = quantization_config(QuantConfig(method="nf4", double_quant=True), torch.bfloat16)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4"  # transformers' default is fp4
    assert q.bnb_4bit_use_double_quant is True
    assert q.bnb_4bit_compute_dtype == torch.bfloat16  # transformers' default is fp32
    assert quantization_config(QuantConfig(method="int8", double_quant=False), torch.float16).load_in_8bit
    assert quantization_config(QuantConfig(method="none", double_quant=False), torch.float32) is None


def test_pad_token_is_distinct_from_eos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.pad_token is None
    ensure_pad_token(tok)
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id


def test_pad_token_falls_back_to_eos_only_when_nothing_else_exists(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.unk_token = None
    vocab = tok.get_vocab()
    assert not any(c in vocab for c in ("<pad>", "[PAD]"))
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.name_or_path=.*/nope: no such folder"):
        check_model_path(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="has no config.json"):
        check_model_path(ModelConfig(name_or_path=str(tmp_path)))


def test_plain_template_trains_the_reply_and_its_eos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert apply_chat_template_choice(tok, None) == "plain"  # the tokenizer has none of its own
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the red fox"}],
        return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "the red fox</s>"
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # one BOS, not two
    with pytest.raises(UserError, match="data.chat_template=nope is not a bundled template"):
        apply_chat_template_choice(tok, "nope")
    assert "plain" in TEMPLATES


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


@pytest.mark.parametrize("bad,expected", [
    ('{"messages": [', ":2: invalid JSON"),
    (json.dumps({"text": "x"}), ":2: the row has no 'messages' field (it has 'text')"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "has role 'bot'; allowed: system, user, assistant"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "has no assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}), "empty"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}), "non-text"),
])
def test_a_malformed_row_is_reported_with_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(UserError) as e:
        load_splits(DataConfig(path=str(path)), seed=0)
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_splits(DataConfig(path=str(tmp_path / "missing.jsonl")), seed=0)
    with pytest.raises(UserError, match="holds no rows"):
        load_splits(DataConfig(path=str(write(tmp_path / "e.jsonl", [""]))), seed=0)
    (tmp_path / "b.jsonl").write_bytes(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_splits(DataConfig(path=str(tmp_path / "b.jsonl")), seed=0)


def test_eval_fraction_is_held_out_deterministically(chat_data):
    a = load_splits(DataConfig(path=str(chat_data), eval_fraction=0.25, eval_max_samples=None), seed=3)
    b = load_splits(DataConfig(path=str(chat_data), eval_fraction=0.25, eval_max_samples=None), seed=3)
    assert (len(a.train), len(a.eval)) == (72, 24)
    assert a.eval["messages"] == b.eval["messages"]
    held_out = {m[0]["content"] for m in a.eval["messages"]}
    assert not held_out & {m[0]["content"] for m in a.train["messages"]}


def test_4bit_layers_stay_differentiable_on_cpu_after_an_eval_pass(tiny_model):
    """Regression: bitsandbytes' CPU inference repacking must not cut the gradient through frozen 4-bit layers."""
    import bitsandbytes as bnb

    from finetune.model import Device, load_base_model

    cpu = Device("cpu", "cpu", True, "fp32", torch.float32)
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model)), QuantConfig(), cpu)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    model.eval()
    with torch.no_grad():  # the pre-training evaluation of the base
        before = model(torch.tensor([[1, 2, 3]])).logits
    model.train()
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():  # eval and training compute the same function
        model.eval()
        assert torch.equal(before, model(torch.tensor([[1, 2, 3]])).logits)
