"""Training and eval data: load, check every row, split.

This version reads conversational data, one row per conversation:
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
from local .jsonl / .json files or a Hugging Face Hub dataset. Every row is checked before training
starts, so a malformed row is reported with its file and line instead of crashing a run late.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.config import DataConfig
from finetune.errors import UserError
from finetune.model import is_local_path

ROLES = ("system", "user", "assistant")
EXAMPLE = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'
MAX_REPORTED = 5


@dataclass
class Splits:
    train: "datasets.Dataset"  # noqa: F821
    eval: Optional["datasets.Dataset"]  # noqa: F821
    eval_source: str


def _read_local(key: str, path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a .jsonl or .json file, and where each came from ('file:line')."""
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file. Give a .jsonl or .json file, or a Hugging Face Hub dataset id.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 BOM is accepted
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}). Re-save the file as UTF-8.") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}). A .json file holds one list of rows.") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json file must hold a list of rows, e.g. [{EXAMPLE}].")
        return rows, [f"{path}[{i}]" for i in range(len(rows))]
    rows, where = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}). "
                            f"Each line of a .jsonl file is one row, e.g. {EXAMPLE}") from None
        where.append(f"{path}:{lineno}")
    if not rows:
        raise UserError(f"{path}: the file holds no rows. Each line of a .jsonl file is one row, e.g. {EXAMPLE}")
    return rows, where


def _row_problem(row) -> Optional[str]:
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    if "messages" not in row:
        return f"has no 'messages' field (it has {', '.join(map(repr, row)) or 'no fields'})"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"message {i} ({m['role']}) has empty or non-text content"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant message, so there is nothing to learn"
    return None


def check_rows(rows, where: list[str]) -> None:
    """One UserError listing the first malformed rows, with where they are and the expected shape."""
    bad = []
    for row, loc in zip(rows, where):
        problem = _row_problem(row)
        if problem:
            bad.append(f"{loc}: the row {problem}.")
            if len(bad) == MAX_REPORTED:
                break
    if bad:
        raise UserError(*bad, f"Each row must look like {EXAMPLE}")


def _is_file(path: str) -> bool:
    """A local file (or a path meant as one) rather than a Hub dataset id."""
    return is_local_path(path) or path.endswith((".jsonl", ".json"))


def _load(key: str, path: str, cfg: DataConfig, split: str):
    import datasets

    if _is_file(path):
        rows, where = _read_local(key, Path(path).expanduser())
        check_rows(rows, where)
        return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    try:
        ds = datasets.load_dataset(path, cfg.name, split=split, revision=cfg.revision)
    except Exception as e:  # datasets raises many types for a wrong id, split or network
        raise UserError(f"{key}={path} (split {split}): could not be loaded ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). Check the dataset id, "
                        "data.name and the split, and your network; or give a local .jsonl file.") from None
    if "messages" not in ds.column_names:
        raise UserError(f"{key}={path}: no 'messages' column (columns: {', '.join(ds.column_names)}). "
                        f"This version trains on conversations: rows like {EXAMPLE}")
    ds = ds.select_columns(["messages"])
    check_rows(ds, [f"{path}[{split}] row {i}" for i in range(len(ds))])
    return ds


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """The training rows and the eval rows (explicit source, explicit split, or a seeded held-out fraction)."""
    train = _load("data.path", cfg.path, cfg, cfg.split)
    if cfg.eval_path or cfg.eval_split:
        source = cfg.eval_path or cfg.path
        eval_ds = _load("data.eval_path" if cfg.eval_path else "data.eval_split", source, cfg, cfg.eval_split or cfg.split)
        eval_source = source if _is_file(source) else f"{source} [{cfg.eval_split or cfg.split}]"
    elif cfg.eval_fraction > 0:
        if len(train) < 2:
            raise UserError(f"data.path={cfg.path} has {len(train)} row(s): too few to hold out an eval split. "
                            "Add rows or set data.eval_path.")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
        eval_source = f"{cfg.eval_fraction:.0%} of {cfg.path}, held out with seed {seed}"
    else:
        eval_ds, eval_source = None, "none"
    if cfg.max_samples:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if eval_ds is not None and cfg.eval_max_samples:
        eval_ds = eval_ds.select(range(min(cfg.eval_max_samples, len(eval_ds))))
    return Splits(train, eval_ds, eval_source)
