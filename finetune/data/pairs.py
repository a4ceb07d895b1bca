"""Preference pairs -> prompt_ids, chosen_ids and rejected_ids (the columns TRL's DPOTrainer trains on), cached on
disk like SFT rows (finetune/data/tokenize.py), with the too-long policy and data.bad_rows applied.

Each answer is scored as SFT trains a reply (finetune/data/masks.py): a conversation's answer is rendered by the
chat template after its prompt as inference renders it, and the answer's tokens with its end-of-turn token are the
completion; the template's separators after it are not part of the sequence. A text pair is prompt + answer + EOS,
with the tokenizer's special tokens. Where the two sides' tokens part before an answer begins (a token merging
across the boundary), both completions start there, as in TRL.
"""

from __future__ import annotations

from finetune.config import DataConfig
from finetune.data import formats, masks
from finetune.data.tokenize import (Tokenized, cache_path, common_prefix, keep_cache_small, labelled, map_cached,
                                    refused_rows, token_ids, too_long_rows)
from finetune.errors import UserError

VERSION = "1"  # bump when the tokenization below changes


def side(row: dict, answer: str, tokenizer) -> tuple[list[int], int]:
    """(token ids of the prompt followed by one answer, where the answer's tokens begin)."""
    if isinstance(row["chosen"], list):
        messages, tools = formats.chat({"messages": row["prompt"] + row[answer], "tools": row.get("tools")})
        t = masks.turn(tokenizer, messages, len(messages) - 1, tools)
        seq = labelled(tokenizer, masks.Sequence(t.text[:t.end], ((t.start, t.end),)))
        return seq["input_ids"], next(i for i, label in enumerate(seq["labels"]) if label != -100)
    text = row[answer] if row[answer].endswith(tokenizer.eos_token) else row[answer] + tokenizer.eos_token
    ids = tokenizer(row["prompt"] + text)["input_ids"]
    return ids, min(common_prefix(tokenizer(row["prompt"])["input_ids"], ids), len(ids) - 1)


def pair_row(row: dict, tokenizer) -> dict:
    """One converted pair as {"prompt_ids", "chosen_ids", "rejected_ids", "length"} (the longer side's tokens)."""
    (chosen, c), (rejected, r) = side(row, "chosen", tokenizer), side(row, "rejected", tokenizer)
    start = min(c, r, common_prefix(chosen, rejected))
    return {"prompt_ids": chosen[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:],
            "length": max(len(chosen), len(rejected))}


def _pairs(batch: dict, indices: list[int], tokenizer) -> dict:
    """datasets.map, batched: each pair's tokens, or an empty entry naming why the template refused it."""
    out: dict = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "length", "row", "problem")}
    for i, values in zip(indices, zip(*batch.values())):
        try:
            pair, problem = pair_row(dict(zip(batch, values)), tokenizer), ""
        except masks.RowProblem as e:
            pair, problem = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": 0}, str(e)
        for key, value in pair.items():
            out[key].append(value)
        out["row"].append(i)
        out["problem"].append(problem)
    return out


def features(tokenizer):
    import datasets

    ids = token_ids(tokenizer)
    return datasets.Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                              "length": datasets.Value("int32"), "row": datasets.Value("int32"),
                              "problem": datasets.Value("string")})


def tokenize_pairs(ds, tokenizer, cfg: DataConfig, name: str, where=None, length_policy: bool = True) -> Tokenized:
    """Tokenize preference pairs (cached), then apply data.bad_rows to the pairs the template refused and
    data.too_long to those over data.max_length (length_policy=False: only count them, for the `data` verb)."""
    if not len(ds):
        raise UserError(f"{name}: no preference pairs to train on.")
    path = cache_path(ds, tokenizer, cfg, f"pairs{VERSION}-{name}")
    out, cached = map_cached(ds, path, function=_pairs, fn_kwargs={"tokenizer": tokenizer}, batched=True,
                             with_indices=True, remove_columns=ds.column_names, features=features(tokenizer),
                             num_proc=cfg.num_proc if len(ds) > 1000 else None, desc=f"Tokenizing {name} pairs")
    keep_cache_small(path)
    out, dropped = refused_rows(out, cfg, name, where)
    out = out.remove_columns(["row", "problem"])
    lengths = list(out["length"])
    if length_policy:
        out, too_long = too_long_rows(out, lengths, cfg, name)
        if cfg.too_long == "truncate":  # TRL's collator cuts each side at max_length: a prompt must leave room
            out = out.filter(lambda p: len(p) < cfg.max_length, input_columns="prompt_ids")
            if len(out) == 0:
                raise UserError(f"Every {name} pair's prompt fills data.max_length={cfg.max_length} tokens, so no "
                                "answer token is left to compare: raise data.max_length.")
    else:
        too_long = sum(n > cfg.max_length for n in lengths)
    return Tokenized(out, too_long=too_long, cached=cached, lengths=lengths, dropped=dropped)
