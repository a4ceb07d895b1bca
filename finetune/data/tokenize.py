"""Rows -> input_ids and labels (-100 where no loss), cached on disk, with the too-long policy applied.

Conversations are rendered by the chat template and masked by finetune/data/masks.py: each assistant reply
and its end-of-turn token are trained, in the context inference gives it. The same function serves training,
`eval` and export's fidelity check, so all three measure the same labels. prompt/completion and text rows get
the EOS appended and the tokenizer's own special tokens. Doing it here, before the trainer, gives the lengths
the too-long policy and the `data` verb need, and a cache: the result is stored under a key made of the rows,
the tokenizer, the template and these settings, so a second run on the same data does not tokenize again.
TRL then takes the tokenized rows as they are (it only truncates and packs).

A row the template refuses (its own raise_exception: "System role not supported", "Conversation roles must
alternate") is a bad row under data.bad_rows, named by file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.config import DataConfig
from finetune.data import formats, masks
from finetune.errors import UserError

log = logging.getLogger("finetune")
VERSION = "2"  # bump when the tokenization below changes, so old cache entries are not reused
MAX_REPORTED = 5


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "tokenized"


@dataclass
class Tokenized:
    dataset: "datasets.Dataset"  # noqa: F821
    too_long: int = 0          # sequences over max_length (dropped, or truncated, as data.too_long says)
    cached: bool = False       # read from the cache, not tokenized in this run
    lengths: list = field(default_factory=list)      # every sequence's length, before any was dropped
    dropped: Counter = field(default_factory=Counter)  # rows the template refused (data.bad_rows=drop)


def tokenize_row(row: dict, tokenizer, train_on_inputs: bool, turns: str = "all") -> list[dict]:
    """The sequences of one converted row, each {"input_ids", "labels", "length", "trained"}: one, or for a
    conversation whose template renders history otherwise, one per assistant turn (data.turns=all)."""
    if row.get("messages"):
        messages, tools = formats.chat(row)
        if train_on_inputs:
            text = masks.render(tokenizer, messages, tools, False)
            return [labelled(tokenizer, masks.Sequence(text, ((0, len(text)),)))]
        return [labelled(tokenizer, s) for s in masks.sequences(tokenizer, messages, tools, turns)]
    if row.get("prompt") is not None:
        completion = row["completion"] if row["completion"].endswith(tokenizer.eos_token) else row["completion"] + tokenizer.eos_token
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        start = 0 if train_on_inputs else common_prefix(prompt_ids, ids)
        return [_sequence(ids, [False] * start + [True] * (len(ids) - start))]
    text = row["text"] if row["text"].endswith(tokenizer.eos_token) else row["text"] + tokenizer.eos_token
    ids = tokenizer(text)["input_ids"]
    return [_sequence(ids, [True] * len(ids))]


def labelled(tokenizer, seq: masks.Sequence) -> dict:
    """The tokens of a rendered sequence, trained where they overlap one of its trained character spans."""
    if not tokenizer.is_fast:
        raise UserError("Assistant-only masks need a fast tokenizer (character offsets): load one with "
                        "tokenizers installed, or set data.train_on_inputs=true.")
    enc = tokenizer(seq.text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s < b and e > a for a, b in seq.spans) for s, e in enc["offset_mapping"]]
    return _sequence(list(enc["input_ids"]), trained)


def _sequence(ids: list[int], trained: list[bool]) -> dict:
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, trained)], "length": len(ids),
            "trained": sum(trained)}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rows(batch: dict, indices: list[int], tokenizer, train_on_inputs: bool, turns: str, longest: int,
          limit: int, truncate: bool) -> dict:
    """datasets.map, batched: each row's sequences, or one empty entry naming why the template refused the row.
    A row with more than `limit` characters of text (char_limit) is not tokenized whole (a 50 MB row would take
    gigabytes): each text is cut to `limit` characters for truncation, which keeps less; otherwise it is one
    empty entry whose length (the fewest tokens of at most `longest` characters its text can be) says it is too
    long."""
    out: dict = {"input_ids": [], "labels": [], "length": [], "trained": [], "row": [], "problem": []}
    for i, values in zip(indices, zip(*batch.values())):
        row = dict(zip(batch, values))
        chars = text_chars(row)
        try:
            if chars > limit and not truncate:
                sequences, problem = [{"input_ids": [], "labels": [], "length": chars // longest, "trained": 1}], ""
            else:
                row = cut_text(row, limit) if chars > limit else row
                sequences, problem = tokenize_row(row, tokenizer, train_on_inputs, turns), ""
        except masks.RowProblem as e:
            sequences, problem = [{"input_ids": [], "labels": [], "length": 0, "trained": 0}], str(e)
        for s in sequences:
            for key in ("input_ids", "labels", "length", "trained"):
                out[key].append(s[key])
            out["row"].append(i)
            out["problem"].append(problem)
    return out


def text_chars(value) -> int:
    """Characters of all the text in a row (its strings, however nested)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(map(text_chars, value.values()))
    if isinstance(value, (list, tuple)):
        return sum(map(text_chars, value))
    return 0


def cut_text(value, limit: int):
    """The row with each of its strings cut to `limit` characters."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, dict):
        return {k: cut_text(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cut_text(v, limit) for v in value]
    return value


def longest_token(tokenizer) -> int:
    """The most characters one token stands for (its written form is at least as long)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def char_limit(max_length: int, longest: int) -> int:
    """Characters of text that surely make more than twice max_length tokens: beyond it a row is not tokenized
    whole (see _rows)."""
    return 2 * max_length * longest


def _key(ds, tokenizer, cfg: DataConfig, name: str) -> str:
    """The rows' Arrow data (fast and exact), the tokenizer, the template and the settings that change the result."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, (str, type(None))) else json.dumps(
        tokenizer.chat_template, sort_keys=True)
    h = hashlib.sha256()
    for part in (VERSION, name, tokenizer.name_or_path, str(len(tokenizer)), template or "", tokenizer.eos_token,
                 str(tokenizer.bos_token), str(cfg.train_on_inputs), cfg.turns,
                 f"{cfg.max_length} {cfg.too_long == 'truncate'}"):  # rows too long to tokenize whole: see _rows
        h.update(part.encode() + b"\0")
    digest_rows(h, ds)
    return h.hexdigest()[:24]


def digest_rows(h, ds) -> None:
    """Feed the dataset's selected rows (whatever index mapping it carries) to the hash `h`: their Arrow data, fast
    and exact."""
    import pyarrow as pa

    table = ds.with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue())


def cache_path(ds, tokenizer, cfg: DataConfig, name: str) -> Path:
    """The cache entry of these rows tokenized as `name` (its folder made)."""
    path = cache_dir() / f"{name}-{_key(ds, tokenizer, cfg, name)}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def token_ids(tokenizer):
    """The narrowest unsigned type that holds this tokenizer's token ids: the cache stays small."""
    import datasets

    return datasets.Sequence(datasets.Value("uint16" if len(tokenizer) <= 2**16 else "uint32"))


def features(tokenizer):
    """The narrowest types that hold the token ids and labels (labels need -100): the cache stays small."""
    import datasets

    labels = "int16" if len(tokenizer) <= 2**15 else "int32"
    return datasets.Features({"input_ids": token_ids(tokenizer),
                              "labels": datasets.Sequence(datasets.Value(labels)), "length": datasets.Value("int32"),
                              "trained": datasets.Value("int32"), "row": datasets.Value("int32"),
                              "problem": datasets.Value("string")})


def tokenize(ds, tokenizer, cfg: DataConfig, name: str, conversational: bool, where: Optional[list] = None,
             length_policy: bool = True) -> Tokenized:
    """Tokenize `ds` (cached), then apply data.bad_rows to the rows the template refused and data.too_long to
    sequences over max_length (length_policy=False: only count them, as the `data` verb shows them). `where`:
    each row's file and line, to name the rows."""
    longest = longest_token(tokenizer)
    limit = char_limit(cfg.max_length, longest)
    if conversational and not cfg.train_on_inputs and len(ds):
        cross_check(tokenizer, cut_text(ds[0], limit), cfg.turns)
        reasoning_check(tokenizer, ds, name, limit)
    path = cache_path(ds, tokenizer, cfg, name)
    kwargs = {"tokenizer": tokenizer, "train_on_inputs": cfg.train_on_inputs, "turns": cfg.turns,
              "longest": longest, "limit": limit, "truncate": cfg.too_long == "truncate"}
    out, cached = map_cached(ds, path, function=_rows, fn_kwargs=kwargs, batched=True, with_indices=True,
                             remove_columns=ds.column_names, features=features(tokenizer),
                             num_proc=cfg.num_proc if len(ds) > 1000 else None, desc=f"Tokenizing {name}")
    keep_cache_small(path)
    if len(out) > len(ds):
        log.info("%s: %d conversations give %d sequences: the chat template renders earlier turns otherwise than "
                 "their own, so each reply is trained in its own context (data.turns=last trains only the last one)",
                 name, len(ds), len(out))
    out, dropped = refused_rows(out, cfg, name, where)
    out = out.remove_columns(["row", "problem"])
    empty = list(out["trained"]).count(0)
    if empty:
        raise UserError(f"{empty} {name} row(s) have no trained token at all: check the chat template and the data.")
    lengths = list(out["length"])
    if length_policy:
        out, too_long = too_long_rows(out, lengths, cfg, name)
    else:
        too_long = sum(n > cfg.max_length for n in lengths)
    return Tokenized(out, too_long=too_long, cached=cached, lengths=lengths, dropped=dropped)


def map_cached(ds, path: Path, **settings):
    """ds.map(**settings) into the cache entry `path`, read back when it is there. A damaged entry (a disk error, a
    copy cut short: pyarrow's own error types) is said, deleted and made again. Returns (rows, read from cache)."""
    cached = any(path.parent.glob(path.stem + "*"))  # with num_proc the cache is split into shards
    try:
        return ds.map(cache_file_name=str(path), load_from_cache_file=True, **settings), cached
    except Exception as e:
        if not cached:
            raise
        log.warning("The tokenization cache entry %s is damaged (%s: %s): it is deleted and the rows tokenized "
                    "again.", path.name, type(e).__name__, (str(e).strip().splitlines() or [""])[0][:120])
        for f in path.parent.glob(path.stem + "*"):
            f.unlink()
        return ds.map(cache_file_name=str(path), load_from_cache_file=True, **settings), False


def refused_rows(out, cfg: DataConfig, name: str, where: Optional[list]):
    """The rows the template refused: an error naming them (data.bad_rows=error), or dropped and counted."""
    problems = [(r, p) for r, p in zip(out["row"], out["problem"]) if p]
    if not problems:
        return out, Counter()
    named = [f"{where[r] if where else f'{name} row {r}'}: {p}" for r, p in problems[:MAX_REPORTED]]
    if cfg.bad_rows == "error":
        more = len(problems) - len(named)
        raise UserError(*named, *([f"... and {more} more."] if more else []),
                        "Fix these rows, or pass data.bad_rows=drop to skip them"
                        + (" (a template without a system role: data.system_prompt=fold puts the system text into "
                           "the first user turn)." if any("ystem" in p for _, p in problems) else "."))
    kept = out.filter(lambda p: not p, input_columns="problem")
    if len(kept) == 0:
        raise UserError(f"{name}: the chat template refuses every row; first: {named[0]}")
    log.warning("%s: dropped %d row(s) the chat template refuses; first: %s", name, len(problems), named[0])
    return kept, Counter({"template refuses": len(problems)})


def too_long_rows(out, lengths: list[int], cfg: DataConfig, name: str):
    """data.too_long for sequences over data.max_length; dropping more than data.max_drop_fraction stops the run."""
    over = [i for i, n in enumerate(lengths) if n > cfg.max_length]
    if not over:
        return out, 0
    keeps_99 = sorted(lengths)[max(0, math.ceil(0.99 * len(lengths)) - 1)]
    if cfg.too_long == "error":
        raise UserError(f"{len(over)} {name} row(s) are longer than data.max_length={cfg.max_length} tokens (the first, "
                        f"row {over[0]}, has {lengths[over[0]]}). Raise data.max_length, or set data.too_long=drop or "
                        "truncate.")
    if cfg.too_long == "drop" and len(over) > cfg.max_drop_fraction * len(lengths):
        raise UserError(f"{len(over)} of {len(lengths)} {name} rows ({len(over) / len(lengths):.0%}) are longer than "
                        f"data.max_length={cfg.max_length} tokens and would be dropped (data.max_drop_fraction="
                        f"{cfg.max_drop_fraction:g}). data.max_length={keeps_99} keeps 99% of them; or set "
                        "data.too_long=truncate, or raise data.max_drop_fraction.")
    if cfg.too_long == "drop":
        out = out.select([i for i, n in enumerate(lengths) if n <= cfg.max_length])
        if len(out) == 0:
            raise UserError(f"Every {name} row is longer than data.max_length={cfg.max_length} tokens: raise it "
                            f"(data.max_length={keeps_99} keeps 99%), or set data.too_long=truncate.")
    log.warning("%s: %d of %d rows are longer than data.max_length=%d tokens and were %s (data.max_length=%d keeps 99%%).",
                name, len(over), len(lengths), cfg.max_length, "dropped" if cfg.too_long == "drop" else "truncated",
                keeps_99)
    return out, len(over)


def cross_check(tokenizer, row: dict, turns: str) -> None:
    """Where the template marks replies with {% generation %}, its marks must cover every token the rendering says
    is a reply; marks over more (markup, separators) are said once and not trained."""
    from trl.chat_template_utils import has_generation_markers

    template = tokenizer.chat_template
    if not isinstance(template, str) or not has_generation_markers(template):
        return
    messages, tools = formats.chat(row)
    (seq, *more) = masks.sequences(tokenizer, messages, tools, turns)
    if more or turns == "last":  # per-turn sequences: the marks describe the whole conversation
        return
    ours = labelled(tokenizer, seq)
    marked = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)["assistant_masks"]
    trained = [label != -100 for label in ours["labels"]]
    if len(marked) != len(trained) or any(t and not m for t, m in zip(trained, marked)):
        raise masks.template_problem("its {% generation %} marks and its rendering disagree on where a reply is")
    extra = [i for i, (t, m) in enumerate(zip(trained, marked)) if m and not t]
    if extra:
        log.info("The chat template's {%% generation %%} marks also cover %d token(s) that are not a reply or its "
                 "end-of-turn token (e.g. %r): they are not trained.", len(extra),
                 tokenizer.decode([ours["input_ids"][extra[0]]]))


def reasoning_check(tokenizer, ds, name: str, limit: int) -> None:
    """Reasoning is trained where the template puts it; a template that does not render it is said, once."""
    if "reasoning_content" not in str(ds.features["messages"]):
        return
    row = next((r for r in ds if any(m.get("reasoning_content") for m in r["messages"])), None)
    if row is None:
        return
    messages, tools = formats.chat(cut_text(row, limit))
    reasoning = next(m["reasoning_content"] for m in messages if m.get("reasoning_content"))
    if reasoning.strip() not in masks.render(tokenizer, messages, tools, False):
        log.warning("%s: the chat template does not render the assistant turns' reasoning (reasoning_content / "
                    "thinking), so it is not trained; a template with reasoning (Qwen3, gpt-oss) would train it.", name)


def keep_cache_small(current: Path) -> None:
    """Evict the oldest cache entries (by last use) while the cache is over FINETUNE_CACHE_MAX_GB (default 20)."""
    for f in current.parent.glob(current.stem + "*"):
        os.utime(f, None)  # this entry is the one used last
    limit = float(os.environ.get("FINETUNE_CACHE_MAX_GB", "20")) * 1e9
    files = sorted((f for f in current.parent.glob("*.arrow") if f.is_file()), key=lambda f: f.stat().st_mtime)
    total, evicted, last_used = sum(f.stat().st_size for f in files), 0, 0.0
    for f in files:
        if total <= limit:
            break
        if not f.name.startswith(current.stem):
            stat = f.stat()
            f.unlink()
            total, evicted, last_used = total - stat.st_size, evicted + 1, stat.st_mtime
    if evicted:
        log.info("tokenization cache: evicted the %d oldest file(s), last used %s, to stay under "
                 "FINETUNE_CACHE_MAX_GB (%.2f GB left)", evicted, time.strftime("%Y-%m-%d %H:%M",
                 time.localtime(last_used)), total / 1e9)
