"""`python -m finetune data`: load, check and tokenize the recipe's data without training, and show it."""

from __future__ import annotations

import sys

from finetune.config import FinetuneConfig
from finetune.data import check_paths, load_splits
from finetune.data.pairs import tokenize_pairs
from finetune.data.templates import apply_chat_template_choice, use_end_of_turn
from finetune.data.tokenize import tokenize
from finetune.tokenizer import load_tokenizer

BAR = 40


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> dict[int, int]:
    ordered = sorted(values)
    return {q: ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] for q in qs}


def histogram(values: list[int], max_length: int, bins: int = 8) -> list[str]:
    """Text histogram of token lengths, in bins of equal width from the shortest row to the longest."""
    low, top = min(values), max(values)
    width = max(1, -(-(top - low + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - low) // width)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    peak = max(counts)
    lines = []
    for i, n in enumerate(counts):
        lo, hi = low + i * width, low + (i + 1) * width - 1
        flag = "  > max_length" if lo > max_length else ""
        lines.append(f"  {lo:>6}-{hi:<6} {'#' * round(BAR * n / peak) if peak else '':<{BAR}} {n}{flag}")
    return lines


def render(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The tokens of one row, the trained ones marked: green on a terminal, [[...]] otherwise."""
    out, trained_run = [], []

    def flush():
        if trained_run:
            text = tokenizer.decode(trained_run)
            out.append(f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]")
            trained_run.clear()

    untrained = []
    for token, label in zip(ids, labels):
        if label == -100:
            flush()
            untrained.append(token)
        else:
            if untrained:
                out.append(tokenizer.decode(untrained))
                untrained.clear()
            trained_run.append(token)
    flush()
    if untrained:
        out.append(tokenizer.decode(untrained))
    return "".join(out)


def report(cfg: FinetuneConfig, color: bool | None = None) -> dict:
    """Print the data report; return its figures."""
    color = sys.stdout.isatty() if color is None else color
    check_paths(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    template = apply_chat_template_choice(tokenizer, cfg.data.chat_template)
    splits = load_splits(cfg.data, cfg.train.seed)
    if splits.chat:
        use_end_of_turn(tokenizer)
    figures = {"format": splits.format, "chat_template": template, "rows_dropped": dict(splits.dropped)}
    print(f"data: {cfg.data.path or 'mixed sources'}  format: {splits.format}  chat template: {template}")
    for source, rows in splits.sources.items():
        print(f"  {source}: {rows} usable training rows")
    figures["sources"] = dict(splits.sources)
    if splits.dropped:
        print("dropped rows: " + ", ".join(f"{n} {reason}" for reason, n in splits.dropped.most_common()))
    tokenized = {}
    for name, ds, where in (("train", splits.train, splits.train_where), ("eval", splits.eval, splits.eval_where)):
        if ds is not None:
            tokenized[name] = figures[name] = split_report(cfg, tokenizer, name, ds, where, splits.conversational,
                                                           splits.preference)
    example = tokenized["train"]["dataset"][0]
    marks = "green" if color else "[[ ]]"
    if splits.preference:
        print(f"\none training pair as the model sees it (the tokens compared in {marks}):\n")
        for side in ("chosen", "rejected"):
            prompt, answer = list(example["prompt_ids"]), list(example[f"{side}_ids"])
            print(f"{side}:\n{render(tokenizer, prompt + answer, [-100] * len(prompt) + answer, color)}\n")
    else:
        print(f"\none training row as the model sees it (trained tokens in {marks}):\n")
        print(render(tokenizer, example["input_ids"], example["labels"], color))
    for split in tokenized.values():
        del split["dataset"]
    return figures


def split_report(cfg: FinetuneConfig, tokenizer, name: str, ds, where, conversational: bool,
                 preference: bool = False) -> dict:
    """One split: every row's length (before anything is dropped; a pair's: its prompt and longer answer), what
    training does with the long ones, the trained tokens of the rows it keeps (a pair's: both answers)."""
    if preference:
        tok = tokenize_pairs(ds, tokenizer, cfg.data, name, where, length_policy=False)
        trained = [len(c) + len(r) for c, r in zip(tok.dataset["chosen_ids"], tok.dataset["rejected_ids"])]
    else:
        tok = tokenize(ds, tokenizer, cfg.data, name, conversational, where, length_policy=False)
        trained = tok.dataset["trained"]
    lengths, limit = tok.lengths, cfg.data.max_length
    kept = [t for n, t in zip(lengths, trained) if n <= limit or cfg.data.too_long == "truncate"]
    p = percentiles(lengths)
    what = {"drop": "dropped", "truncate": "truncated", "error": "refused"}[cfg.data.too_long]
    print(f"\n{name}: {len(ds)} rows ({tok.too_long} longer than max_length={limit}: {what}), "
          f"{sum(lengths)} tokens, {sum(kept)} of them trained"
          f"{' (tokenized before: read from the cache)' if tok.cached else ''}")
    if tok.dropped:
        print(f"  {sum(tok.dropped.values())} rows the chat template refuses: dropped (data.bad_rows=drop)")
    print("  tokens per row: " + ", ".join(f"p{q} {v}" for q, v in p.items()))
    print("\n".join(histogram(lengths, limit)))
    stops = tok.too_long and (cfg.data.too_long == "error" or tok.too_long > cfg.data.max_drop_fraction * len(lengths))
    if stops:
        print(f"  training would stop here: {tok.too_long} rows over data.max_length={limit} "
              f"(data.too_long={cfg.data.too_long}, data.max_drop_fraction={cfg.data.max_drop_fraction:g}); "
              f"data.max_length={p[99]} keeps 99%")
    return {"rows": len(ds), "rows_kept": len(kept), "too_long": tok.too_long, "tokens": sum(lengths),
            "trained_tokens": sum(kept), "length_percentiles": p, "cached": tok.cached,
            "rows_refused": sum(tok.dropped.values()), "dataset": tok.dataset}
