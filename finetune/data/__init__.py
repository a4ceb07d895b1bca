"""Training and eval data: read, detect the format, check every row, convert, split.

Sources: local .jsonl / .json / .csv / .parquet files or a folder of them, or a Hugging Face Hub
dataset. Every row is checked before tokenization, so a malformed row is reported with its file and
line (data.bad_rows=error, the default) or dropped and counted (data.bad_rows=drop), instead of
crashing a run late. Formats: see finetune/data/formats.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.config import DataConfig
from finetune.data import formats
from finetune.errors import UserError
from finetune.tokenizer import is_local_path

log = logging.getLogger("finetune")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_REPORTED = 5
WHERE = "_where"  # a converted row's file and line, carried until load_splits hands it over in Splits


@dataclass
class Rows:
    """Rows of one source as read, each with where it came from; a row that could not be read is None
    with its problem."""
    rows: list = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    unreadable: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (reason, detail)


@dataclass
class Splits:
    train: "datasets.Dataset"  # noqa: F821
    eval: Optional["datasets.Dataset"]  # noqa: F821
    eval_source: str
    format: str = "messages"
    dropped: Counter = field(default_factory=Counter)  # reason -> rows dropped (data.bad_rows=drop)
    sources: dict = field(default_factory=dict)         # source -> its usable training rows, before mixing
    train_where: list = field(default_factory=list)     # each training row's file and line, for later problems
    eval_where: list = field(default_factory=list)

    @property
    def conversational(self) -> bool:
        return self.format in formats.CONVERSATIONAL

    @property
    def preference(self) -> bool:
        return self.format in formats.PREFERENCE

    @property
    def chat(self) -> bool:
        """Rendered by the chat template: conversations, or preference pairs of conversations."""
        return self.conversational or self.format == "preference_chat"


def chosen_rows(rows) -> Optional[list[dict]]:
    """Each preference pair's chosen side as an SFT row (a conversation, or prompt/completion): what greedy answers,
    the loss of `eval` and the export's merge check score a preference run on."""
    if rows is None:
        return None
    return [{"messages": r["prompt"] + r["chosen"], **({"tools": r["tools"]} if r.get("tools") else {})}
            if isinstance(r["chosen"], list) else {"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def check_rows(splits: Splits):
    """The rows a finished model is checked on (export's merge check, `prune`'s scores): the eval split, else the
    training rows; of preference pairs, their chosen sides (as a dataset)."""
    import datasets

    rows = splits.eval if splits.eval is not None else splits.train
    return datasets.Dataset.from_list(chosen_rows(rows)) if splits.preference else rows


def check_objective(splits: Splits, objective: str, where: str) -> None:
    """Preference pairs train with train.objective=dpo or orpo, and only they do."""
    if splits.preference and objective == "sft":
        raise UserError(f"{where} holds preference pairs ({splits.format}: prompt, chosen, rejected), which "
                        "supervised fine-tuning (train.objective=sft) cannot learn from: set train.objective=dpo "
                        "(or orpo), or give rows like " + formats.EXAMPLES["messages"] + ".")
    if not splits.preference and objective != "sft":
        raise UserError(f"train.objective={objective} learns from preference pairs, but {where} is in the "
                        f"{splits.format} format (no chosen and rejected answers). Give rows like "
                        f"{formats.EXAMPLES['preference_chat']} or {formats.EXAMPLES['preference']}, or set "
                        "train.objective=sft.")


def _is_file(path: str) -> bool:
    """A local file or folder (or a path meant as one) rather than a Hub dataset id."""
    return is_local_path(path) or path.endswith(SUFFIXES)


def _read_jsonl(path: Path, out: Rows) -> None:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is accepted
        data = data[3:]
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        out.where.append(f"{path}:{lineno}")
        try:
            out.rows.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            out.unreadable[len(out.rows)] = ("not UTF-8", f"byte {e.start} is not UTF-8; re-save the file as UTF-8")
            out.rows.append(None)
        except json.JSONDecodeError as e:
            out.unreadable[len(out.rows)] = ("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno}); "
                                             "each line of a .jsonl file is one JSON object")
            out.rows.append(None)
        except RecursionError:
            out.unreadable[len(out.rows)] = ("nested too deeply", "JSON nested too deeply to read (thousands of "
                                             "levels); a row is one object of messages or fields")
            out.rows.append(None)


def _read_file(path: Path, out: Rows) -> None:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, out)
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(rows, list):
                raise UserError(f"{path}: a .json file must hold a list of rows, e.g. [{formats.EXAMPLES['messages']}].")
            where = [f"{path}[{i}]" for i in range(len(rows))]
        elif path.suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
            where = [f"{path}:{i + 2}" for i in range(len(rows))]  # line 1 is the header
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            where = [f"{path} row {i}" for i in range(len(rows))]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}). Re-save the file as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}). A .json file holds one list of rows.") from None
    except UserError:
        raise
    except Exception as e:  # pyarrow raises its own types for a file that is not Parquet
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]} ({type(e).__name__}: {e}).") from None
    out.rows.extend(rows)
    out.where.extend(where)


def missing(key: str, path) -> UserError:
    return UserError(f"{key}={path}: no such file or folder. Give a {', '.join(SUFFIXES)} file, a folder of them, or "
                     "a Hugging Face Hub dataset id.")


def check_paths(cfg: DataConfig) -> None:
    """Each local data file or folder is there: said first, before a model or tokenizer is fetched."""
    paths = [("data.path", cfg.path), ("data.eval_path", cfg.eval_path),
             *((f"data.sources[{i}].path", src.path) for i, src in enumerate(cfg.sources))]
    for key, path in paths:
        if path and _is_file(path) and not Path(path).expanduser().exists():
            raise missing(key, path)


def _read_local(key: str, path: Path) -> Rows:
    if path.is_dir():
        named = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        files = [p for p in named if p.is_file()]  # a folder, FIFO, socket or broken link named *.jsonl is not read
        for p in sorted(set(named) - set(files)):
            log.warning("%s=%s: skipping %s, which is not a regular file.", key, path, p.name)
        if not files:
            raise UserError(f"{key}={path}: the folder holds no {', '.join(SUFFIXES)} files.")
    elif path.exists() and not path.is_file():
        raise UserError(f"{key}={path}: not a regular file or folder (a FIFO, socket or device): give a "
                        f"{', '.join(SUFFIXES)} file or a folder of them.")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{key}={path}: unsupported file type; use {', '.join(SUFFIXES)} (or a folder of them).")
        files = [path]
    else:
        raise missing(key, path)
    out = Rows()
    for f in files:
        _read_file(f, out)
    if not out.rows:
        raise UserError(f"{key}={path}: holds no rows. One row looks like {formats.EXAMPLES['messages']}")
    return out


def _read_hub(key: str, path: str, cfg: DataConfig, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(path, cfg.name, split=split, revision=cfg.revision)
    except Exception as e:  # datasets raises many types for a wrong id, split or network
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{key}={path} (split {split}): could not be loaded ({type(e).__name__}: {first}). Check the "
                        "dataset id, data.name and the split, and your network; or give a local file.") from None
    return Rows(rows=list(ds), where=[f"{path}[{split}] row {i}" for i in range(len(ds))])


def _prepare(key: str, source: Rows, cfg: DataConfig, fmt: str) -> tuple["datasets.Dataset", Counter]:  # noqa: F821
    """Check every row as `fmt`; convert the good ones; apply data.bad_rows to the rest."""
    import datasets

    good, bad, dropped = [], [], Counter()
    for i, (row, where) in enumerate(zip(source.rows, source.where)):
        unreadable = source.unreadable.get(i)
        problem = unreadable or formats.check(formats.rename(row, cfg.columns.mapping()), fmt)
        if problem:
            dropped[problem[0]] += 1
            if len(bad) < MAX_REPORTED:
                bad.append(f"{where}: {problem[1]}" if unreadable else f"{where}: the row {problem[1]}")
        else:
            converted = formats.convert(formats.rename(row, cfg.columns.mapping()), fmt, cfg.system_prompt == "fold")
            good.append(converted | {WHERE: where})
    if bad and cfg.bad_rows == "error":
        more = sum(dropped.values()) - len(bad)
        raise UserError(*bad, *([f"... and {more} more."] if more else []),
                        f"Rows must be in the {fmt} format, e.g. {formats.EXAMPLES[fmt]} "
                        "(set data.format if it is another), or pass data.bad_rows=drop to skip bad rows.")
    if dropped:
        log.warning("%s: dropped %d of %d rows (%s); first: %s", key, sum(dropped.values()), len(source.rows),
                    ", ".join(f"{n} {reason}" for reason, n in dropped.most_common()), bad[0])
    if not good:
        raise UserError(f"{key}: no usable rows are left after dropping {sum(dropped.values())} bad ones "
                        f"({', '.join(f'{n} {r}' for r, n in dropped.most_common())}). First: {bad[0]}")
    return datasets.Dataset.from_list(good), dropped


def _format_of(key: str, source: Rows, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fmt, counts = formats.detect([r for r in source.rows if r is not None], cfg.columns.mapping())
    if not fmt and source.unreadable:  # nothing could be read: that is the problem to report
        raise UserError(*[f"{source.where[i]}: {detail}" for i, (_, detail) in list(source.unreadable.items())[:MAX_REPORTED]])
    if not fmt:
        keys = sorted({k for r in source.rows if isinstance(r, dict) for k in formats.rename(r, cfg.columns.mapping())})
        raise UserError(f"{key}: no row matches a known format (fields seen: {', '.join(keys) or 'none'}). Formats: "
                        + "; ".join(f"{f}: {e}" for f, e in formats.EXAMPLES.items())
                        + ". Map other column names with data.columns, e.g. data.columns.instruction=question data.columns.output=answer.")
    if len(counts) > 1:
        log.info("%s: format %s (rows matching each format: %s)", key, fmt, dict(counts))
    return fmt


def _check_columns(key: str, path: str, source: Rows, cfg: DataConfig) -> None:
    """Each data.columns entry names a column the rows have: a typo would otherwise be ignored."""
    seen = {k for r in source.rows if isinstance(r, dict) for k in r}
    missing = [f"data.columns.{ours}={theirs}" for ours, theirs in cfg.columns.mapping().items() if theirs not in seen]
    if missing:
        raise UserError(f"{', '.join(missing)}: no row of {key}={path} has such a column (its columns: "
                        f"{', '.join(sorted(seen)) or 'none'}). Name one of them, or leave the key out.")


def _load(key: str, path: str, cfg: DataConfig, split: str, fmt: Optional[str] = None):
    source = _read_local(key, Path(path).expanduser()) if _is_file(path) else _read_hub(key, path, cfg, split)
    _check_columns(key, path, source, cfg)
    fmt = fmt or _format_of(key, source, cfg)
    ds, dropped = _prepare(key, source, cfg, fmt)
    return ds, fmt, dropped


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """The training rows and the eval rows: one source (data.path) or several mixed by weight (data.sources)."""
    splits = _mix(cfg, seed) if cfg.sources else _load_one(cfg, seed)
    if cfg.max_samples:
        splits.train = splits.train.select(range(min(cfg.max_samples, len(splits.train))))
    if splits.eval is not None and cfg.eval_max_samples:
        splits.eval = splits.eval.select(range(min(cfg.eval_max_samples, len(splits.eval))))
    splits.train_where, splits.train = splits.train[WHERE], splits.train.remove_columns(WHERE)
    if splits.eval is not None:
        splits.eval_where, splits.eval = splits.eval[WHERE], splits.eval.remove_columns(WHERE)
    return splits


def _load_one(cfg: DataConfig, seed: int) -> Splits:
    """One source; eval from an explicit source or split, or a seeded held-out fraction."""
    train, fmt, dropped = _load("data.path", cfg.path, cfg, cfg.split)
    sources = {cfg.path: len(train)}
    if cfg.eval_path or cfg.eval_split:
        source = cfg.eval_path or cfg.path
        eval_ds, _, eval_dropped = _load("data.eval_path" if cfg.eval_path else "data.eval_split", source, cfg,
                                         cfg.eval_split or cfg.split, fmt if not cfg.eval_path else None)
        dropped += eval_dropped
        eval_source = source if _is_file(source) else f"{source} [{cfg.eval_split or cfg.split}]"
    elif cfg.eval_fraction > 0:
        if len(train) < 2:
            raise UserError(f"data.path={cfg.path} has {len(train)} usable row(s): too few to hold out an eval split. "
                            "Add rows or set data.eval_path.")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
        eval_source = f"{cfg.eval_fraction:.0%} of {cfg.path}, held out with seed {seed}"
    else:
        eval_ds, eval_source = None, "none"
    return Splits(train, eval_ds, eval_source, fmt, dropped, sources)


def _kind(fmt: str) -> str:
    """What a format trains as: conversations, prompt/completion, text or preference pairs (as text or as
    conversations). Mixed sources must agree."""
    return "conversations" if fmt in formats.CONVERSATIONAL else fmt


def _mix(cfg: DataConfig, seed: int) -> Splits:
    """Each source loaded and split on its own (so no repeated row reaches eval), then interleaved by weight."""
    import datasets

    explicit_eval = bool(cfg.eval_path or cfg.eval_split)
    parts = []
    for i, src in enumerate(cfg.sources):
        one = dataclasses.replace(cfg, path=src.path, name=src.name, split=src.split, revision=src.revision,
                                  format=src.format, columns=src.columns, sources=[], eval_path=None,
                                  eval_split=None, eval_fraction=0.0 if explicit_eval else cfg.eval_fraction)
        parts.append(_load_one(one, seed))
    kinds = {_kind(p.format) for p in parts}
    if len(kinds) > 1:
        listing = ", ".join(f"{s.path} ({p.format})" for s, p in zip(cfg.sources, parts))
        raise UserError(f"data.sources mix {' and '.join(sorted(kinds))}, which cannot be trained together: {listing}. "
                        "Mix conversational sources (messages, sharegpt, instruction) with each other only.")
    total = sum(s.weight for s in cfg.sources)
    train = datasets.interleave_datasets([p.train for p in parts], probabilities=[s.weight / total for s in cfg.sources],
                                         seed=seed, stopping_strategy="all_exhausted")
    dropped = sum((p.dropped for p in parts), Counter())
    if explicit_eval:
        source = cfg.eval_path or cfg.sources[0].path
        eval_ds, _, eval_dropped = _load("data.eval_path" if cfg.eval_path else "data.eval_split", source, cfg,
                                         cfg.eval_split or cfg.sources[0].split)
        dropped += eval_dropped
        eval_source = source
    else:
        evals = [p.eval for p in parts if p.eval is not None]
        eval_ds = datasets.concatenate_datasets(evals) if evals else None
        eval_source = f"{cfg.eval_fraction:.0%} of each source, held out with seed {seed}" if evals else "none"
    sources = {f"{s.path} (weight {s.weight:g})": len(p.train) for s, p in zip(cfg.sources, parts)}
    log.info("data: %d rows mixed from %s", len(train), ", ".join(f"{k}: {n} rows" for k, n in sources.items()))
    return Splits(train, eval_ds, eval_source, parts[0].format, dropped, sources)
