"""Rows -> input_ids and labels (-100 where no loss), cached on disk, with the too-long policy applied.

Tokenization matches what TRL's SFTTrainer does with the same rows: conversations through the chat
template with its {% generation %} marks (assistant-only loss), prompt/completion and text with the EOS
appended and the tokenizer's own special tokens. Doing it here, before the trainer, gives the lengths the
too-long policy and the `data` verb need, and a cache: the result is stored under a key made of the
rows, the tokenizer, the template and these settings, so a second run on the same data does not
tokenize again. TRL then takes the tokenized rows as they are (it only truncates and packs).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.config import DataConfig
from finetune.errors import UserError

log = logging.getLogger("finetune")
VERSION = "1"  # bump when the tokenization below changes, so old cache entries are not reused


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "tokenized"


@dataclass
class Tokenized:
    dataset: "datasets.Dataset"  # noqa: F821
    too_long: int = 0          # rows over max_length (dropped, or truncated, as data.too_long says)
    cached: bool = False       # read from the cache, not tokenized in this run


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(row: dict, tokenizer, train_on_inputs: bool) -> dict:
    """{"input_ids", "labels"} for one converted row."""
    if row.get("messages"):
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=not train_on_inputs)
        ids = list(out["input_ids"])
        trained = [1] * len(ids) if train_on_inputs else list(out["assistant_masks"])
    elif row.get("prompt") is not None:
        completion = row["completion"] if row["completion"].endswith(tokenizer.eos_token) else row["completion"] + tokenizer.eos_token
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        start = 0 if train_on_inputs else _common_prefix(prompt_ids, ids)
        trained = [0] * start + [1] * (len(ids) - start)
    else:
        text = row["text"] if row["text"].endswith(tokenizer.eos_token) else row["text"] + tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
        trained = [1] * len(ids)
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, trained)], "length": len(ids),
            "trained": sum(1 for m in trained if m)}


def _key(ds, tokenizer, cfg: DataConfig, name: str) -> str:
    """The rows' Arrow data (fast and exact), the tokenizer, the template and the settings that change the result."""
    import pyarrow as pa

    h = hashlib.sha256()
    for part in (VERSION, name, tokenizer.name_or_path, str(len(tokenizer)), tokenizer.chat_template or "",
                 tokenizer.eos_token, str(tokenizer.bos_token), str(cfg.train_on_inputs)):
        h.update(part.encode() + b"\0")
    table = ds.with_format("arrow")[:]  # the selected rows only, whatever index mapping the dataset carries
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue())
    return h.hexdigest()[:24]


def training_template(tokenizer) -> Optional[str]:
    """A chat template with {% generation %} marks for assistant-only loss: the tokenizer's own, or TRL's
    patched version of a known template; None if neither marks the assistant's turns."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if tokenizer.chat_template and has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # an unknown template: TRL cannot patch it
        return None


def tokenize(ds, tokenizer, cfg: DataConfig, name: str, conversational: bool) -> Tokenized:
    """Tokenize `ds` (cached), then apply data.too_long."""
    inference_template = tokenizer.chat_template
    if conversational and not cfg.train_on_inputs:
        template = training_template(tokenizer)
        if template is None:
            raise UserError("The tokenizer's chat template does not mark the assistant's replies ({% generation %}), "
                            "so assistant-only loss cannot be computed: set data.chat_template to a bundled one, or "
                            "data.train_on_inputs=true.")
        tokenizer.chat_template = template
    try:
        path = cache_dir() / f"{name}-{_key(ds, tokenizer, cfg, name)}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = any(path.parent.glob(path.stem + "*"))  # with num_proc the cache is split into shards
        out = ds.map(tokenize_row, fn_kwargs={"tokenizer": tokenizer, "train_on_inputs": cfg.train_on_inputs},
                     remove_columns=ds.column_names, num_proc=cfg.num_proc if len(ds) > 1000 else None,
                     cache_file_name=str(path), load_from_cache_file=True, desc=f"Tokenizing {name}")
    finally:
        tokenizer.chat_template = inference_template  # what is saved with the adapter: the inference template
    empty = list(out["trained"]).count(0)
    if empty:
        raise UserError(f"{empty} {name} row(s) have no trained token at all: check the chat template and the data.")
    lengths = list(out["length"])
    over = [i for i, n in enumerate(lengths) if n > cfg.max_length]
    if over and cfg.too_long == "error":
        raise UserError(f"{len(over)} {name} row(s) are longer than data.max_length={cfg.max_length} tokens (the first, "
                        f"row {over[0]}, has {lengths[over[0]]}). Raise data.max_length, or set data.too_long=drop or "
                        "truncate.")
    if over and cfg.too_long == "drop":
        out = out.select([i for i, n in enumerate(lengths) if n <= cfg.max_length])
        if len(out) == 0:
            raise UserError(f"Every {name} row is longer than data.max_length={cfg.max_length} tokens: raise it, or "
                            "set data.too_long=truncate.")
    if over:
        log.warning("%s: %d of %d rows are longer than data.max_length=%d tokens and were %s.", name, len(over),
                    len(lengths), cfg.max_length, "dropped" if cfg.too_long == "drop" else "truncated")
    return Tokenized(out, too_long=len(over), cached=cached)
