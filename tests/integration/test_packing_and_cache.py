"""Packing keeps rows apart; too-long rows follow data.too_long; tokenization is cached."""

import json

import pytest
import torch

from finetune.config import DataConfig
from finetune.data import load_splits
from finetune.data.templates import apply_chat_template_choice
from finetune.data.tokenize import tokenize
from finetune.errors import UserError


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_rows_do_not_attend_to_each_other(tiny_model, attn):
    """Each row's logits are the same alone and packed with others through TRL's padding-free collator."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.config import TrainConfig
    from finetune.model import Device
    from finetune.trainer import build_sft_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn, dtype=torch.float32).eval()
    args = build_sft_config(TrainConfig(), DataConfig(path="x", packing=True), Device("cpu", "cpu", True, "fp32",
                            torch.float32), "/tmp/unused", "none", "t")
    assert args.packing and args.padding_free is False and args.packing_strategy == "bfd"  # bfd => padding-free in TRL
    model.config.use_cache = getattr(args, "use_cache", False)  # as the Trainer sets it: no KV cache in training
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 12, 5)]
    alone = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]
    collator = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    batch = collator([{"input_ids": r, "seq_lengths": [len(r)]} for r in rows])
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(5)] and "attention_mask" not in batch
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    for logits, piece in zip(alone, packed.split([7, 12, 5])):
        torch.testing.assert_close(piece, logits, rtol=1e-4, atol=1e-5)
    # without the position ids the rows would see each other: the test can tell
    mixed = model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(mixed[7:19], alone[1], atol=1e-3)


def rows_file(path, lengths):
    path.write_text("".join(json.dumps({"text": " ".join(["fox"] * n)}) + "\n" for n in lengths))
    return path


def tokenizer_for(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    apply_chat_template_choice(tok, None)
    return tok


def test_too_long_rows_are_dropped_truncated_or_refused(tiny_model, tmp_path):
    tok = tokenizer_for(tiny_model)
    path = rows_file(tmp_path / "d.jsonl", [3, 4, 40, 50])
    cfg = DataConfig(path=str(path), eval_fraction=0, max_length=20)
    train = load_splits(cfg, 0).train
    with pytest.raises(UserError, match=r"2 of 4 train rows \(50%\) are longer than data.max_length=20 tokens and "
                                        r"would be dropped \(data.max_drop_fraction=0.1\). data.max_length=52 keeps 99%"):
        tokenize(train, tok, cfg, "train", False)  # dropping half the data is not done quietly
    cfg.max_drop_fraction = 0.5
    dropped = tokenize(train, tok, cfg, "train", False)
    assert (len(dropped.dataset), dropped.too_long) == (2, 2)
    assert max(dropped.dataset["length"]) <= 20 and len(dropped.lengths) == 4 and max(dropped.lengths) > 40  # all, before
    cfg.too_long = "truncate"
    kept = tokenize(train, tok, cfg, "train", False)
    assert (len(kept.dataset), kept.too_long) == (4, 2)  # TRL truncates them to max_length
    cfg.too_long = "error"
    with pytest.raises(UserError, match="2 train row.s. are longer than data.max_length=20 tokens"):
        tokenize(train, tok, cfg, "train", False)
    cfg.too_long, cfg.max_length, cfg.max_drop_fraction = "drop", 8, 1.0
    with pytest.raises(UserError, match="No training row fits|Every train row is longer"):
        tokenize(load_splits(DataConfig(path=str(rows_file(tmp_path / "e.jsonl", [30, 40])), eval_fraction=0), 0).train,
                 tok, cfg, "train", False)


def test_a_second_run_reads_the_tokenized_rows_from_the_cache(tiny_model, tmp_path, monkeypatch):
    import finetune.data.tokenize as tokenize_module

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = tokenize_module.tokenize_row
    monkeypatch.setattr(tokenize_module, "tokenize_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = tokenizer_for(tiny_model)
    cfg = DataConfig(path=str(rows_file(tmp_path / "d.jsonl", [3, 4, 5])), eval_fraction=0, max_length=64)
    train = load_splits(cfg, 0).train
    first = tokenize(train, tok, cfg, "train", False)
    assert (first.cached, len(calls)) == (False, 3)
    second = tokenize(load_splits(cfg, 0).train, tok, cfg, "train", False)
    assert (second.cached, len(calls)) == (True, 3)  # not tokenized again
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    cfg.train_on_inputs = True  # another setting is another cache entry
    assert not tokenize(train, tok, cfg, "train", False).cached and len(calls) == 6


@pytest.mark.slow
def test_padding_free_batches_give_the_same_losses(tiny_args, cli, tmp_path):
    """data.padding_free concatenates each micro-batch's rows instead of padding them: same loss, step by step."""
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        result = cli(*tiny_args(out, f"data.padding_free={flag}"))
        assert result.returncode == 0, result.stderr[-2000:]
        losses[flag] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-3)
    assert losses["true"][-1] < losses["true"][0]


def test_the_cache_stores_narrow_types_and_evicts_the_oldest(tiny_model, tmp_path, monkeypatch, caplog):
    import logging

    import datasets

    from finetune.data.tokenize import cache_dir

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    tok = tokenizer_for(tiny_model)  # 323 tokens: ids fit 16 bits unsigned, labels (with -100) 16 bits signed
    cfg = DataConfig(path=str(rows_file(tmp_path / "a.jsonl", [3, 4, 5])), eval_fraction=0, max_length=64)
    first = tokenize(load_splits(cfg, 0).train, tok, cfg, "train", False)
    (entry,) = cache_dir().glob("train-*.arrow")
    stored = datasets.Dataset.from_file(str(entry)).features
    assert (stored["input_ids"].feature.dtype, stored["labels"].feature.dtype) == ("uint16", "int16")
    assert first.dataset["labels"][0][0] == first.dataset["input_ids"][0][0]  # read back as the same ids
    monkeypatch.setenv("FINETUNE_CACHE_MAX_GB", str(entry.stat().st_size * 1.5 / 1e9))  # room for one entry
    other = DataConfig(path=str(rows_file(tmp_path / "b.jsonl", [6, 7, 8])), eval_fraction=0, max_length=64)
    with caplog.at_level(logging.INFO, logger="finetune"):
        tokenize(load_splits(other, 0).train, tok, other, "train", False)
    assert not entry.exists() and len(list(cache_dir().glob("train-*.arrow"))) == 1
    assert "tokenization cache: evicted the 1 oldest file(s)" in caplog.text


@pytest.mark.parametrize("damage", [lambda b: b[:100], lambda b: b"x" * 1000, lambda b: b""],
                         ids=["cut short", "garbage", "empty"])
def test_a_damaged_cache_entry_is_tokenized_again(tiny_model, tmp_path, monkeypatch, caplog, damage):
    from finetune.data.tokenize import cache_dir

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    tok = tokenizer_for(tiny_model)
    cfg = DataConfig(path=str(rows_file(tmp_path / "a.jsonl", [3, 4, 5])), eval_fraction=0, max_length=64)
    rows = load_splits(cfg, 0).train
    ids = list(tokenize(rows, tok, cfg, "train", False).dataset["input_ids"])  # read before its file is damaged
    (entry,) = cache_dir().glob("train-*.arrow")
    entry.write_bytes(damage(entry.read_bytes()))
    again = tokenize(rows, tok, cfg, "train", False)
    assert "The tokenization cache entry" in caplog.text and "is damaged" in caplog.text
    assert not again.cached and list(again.dataset["input_ids"]) == ids
    assert tokenize(rows, tok, cfg, "train", False).cached  # the entry is whole again


def family_replica(name: str):
    from transformers import AutoModelForCausalLM

    from tests.arch_families import FAMILIES, tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(FAMILIES[name], 300, dict(bos_token_id=0, eos_token_id=1,
                                                                                 pad_token_id=2)))


ROWS = {"input_ids": [list(range(3, 3 + n)) for n in (20, 14, 9)]}


@pytest.mark.parametrize("name, exact", [("llama3_1", True), ("qwen3_moe", True), ("gemma3", True),
                                         ("qwen3_5", False), ("gpt_oss", False)])
def test_padding_free_is_on_by_default_exactly_where_the_models_logits_stay_the_same(name, exact):
    """data.padding_free=null asks the model itself: attention-only families give the same next-token distributions
    padded and concatenated; Qwen3.5's linear attention carries state across rows, and gpt-oss's eager attention does
    not keep them apart. There, packing or padding-free asked for is one message."""
    from finetune.trainer import settle_padding_free

    model = family_replica(name)
    data = DataConfig()
    kl = settle_padding_free(data, model, ROWS, sharded=False)
    assert data.padding_free is exact and (kl < 1e-4 if exact else kl > 0.1)
    assert model.training  # put back as it was
    for asked in (DataConfig(packing=True), DataConfig(padding_free=True)):
        if exact:
            settle_padding_free(asked, model, ROWS, sharded=False)
        else:
            with pytest.raises(UserError, match="change when rows are concatenated"):
                settle_padding_free(asked, model, ROWS, sharded=False)
    off = DataConfig(padding_free=False)
    assert settle_padding_free(off, model, ROWS, sharded=False) is None and off.padding_free is False
