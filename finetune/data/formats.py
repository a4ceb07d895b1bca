"""Row formats: detection from every row's keys, per-row checks, and conversion to what TRL trains on.

    messages           {"messages": [{"role", "content"}, ...]}                -> messages (assistant-only loss)
    sharegpt           {"conversations": [{"from", "value"}, ...]}             -> messages
    instruction        {"instruction", "input" (optional), "output"}           -> messages (loss on the output)
    prompt_completion  {"prompt", "completion"}                                -> prompt/completion (loss on the completion)
    text               {"text"}                                                -> text (loss on everything)

A check returns (reason, detail) for a bad row: the reason is what the counts of dropped rows are
grouped by, the detail names the field.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMATS = list(REQUIRED)  # also the order in which a tie between formats is broken
CONVERSATIONAL = {"messages", "sharegpt", "instruction"}
EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "instruction": '{"instruction": "Translate to French", "input": "cat", "output": "chat"}',
    "prompt_completion": '{"prompt": "The capital of France is", "completion": " Paris."}',
    "text": '{"text": "Any text to continue pre-training on."}',
}
Problem = Optional[tuple[str, str]]


def rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns ({our name: the dataset's name}) to a row."""
    if not columns or not isinstance(row, dict):
        return row
    theirs = {v: k for k, v in columns.items()}
    return {theirs.get(k, k): v for k, v in row.items()}


def detect(rows: list, columns: dict[str, str]) -> tuple[str, Counter]:
    """The format most rows have every required field of (ties: the first in FORMATS), and the counts."""
    counts: Counter = Counter()
    for row in rows:
        row = rename(row, columns)
        if isinstance(row, dict):
            counts.update(f for f, keys in REQUIRED.items() if all(k in row for k in keys))
    if not counts:
        return "", counts
    best = max(counts.values())
    return next(f for f in FORMATS if counts[f] == best), counts


def _text(row: dict, key: str, optional: bool = False) -> Problem:
    if key not in row or row[key] is None:
        return None if optional else ("missing field", f"has no '{key}' field")
    if not isinstance(row[key], str):
        return ("wrong type", f"field '{key}' is a {type(row[key]).__name__}, not text")
    if not optional and not row[key].strip():
        return ("empty field", f"field '{key}' is empty")
    return None


def _turns(turns, field: str, role_key: str, text_key: str, roles) -> Problem:
    if not isinstance(turns, list) or not turns:
        return ("wrong type", f"field '{field}' must be a non-empty list of {{{role_key}, {text_key}}} objects")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            return ("missing field", f"{field}[{i}] must be an object with '{role_key}' and '{text_key}'")
        if turn[role_key] not in roles:
            return ("unknown role", f"{field}[{i}] has {role_key} {turn[role_key]!r}; allowed: {', '.join(roles)}")
        if not isinstance(turn[text_key], str) or not turn[text_key].strip():
            return ("empty field", f"{field}[{i}] ({turn[role_key]}) has empty or non-text '{text_key}'")
    return None


def check(row, fmt: str) -> Problem:
    """Why `row` cannot be trained on as `fmt`, or None."""
    if not isinstance(row, dict):
        return ("not an object", f"is a {type(row).__name__}, not an object")
    missing = [k for k in REQUIRED[fmt] if k not in row]
    if missing:
        return ("missing field", f"has no '{missing[0]}' field (it has {', '.join(map(repr, row)) or 'no fields'})")
    if fmt == "messages":
        problem = _turns(row["messages"], "messages", "role", "content", ROLES)
        if not problem and not any(m["role"] == "assistant" for m in row["messages"]):
            problem = ("no assistant turn", "has no assistant message, so there is nothing to learn")
        return problem
    if fmt == "sharegpt":
        problem = _turns(row["conversations"], "conversations", "from", "value", list(SHAREGPT_ROLES))
        if not problem and not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in row["conversations"]):
            problem = ("no assistant turn", "has no gpt/assistant turn, so there is nothing to learn")
        return problem
    if fmt == "instruction":
        return _text(row, "instruction") or _text(row, "input", optional=True) or _text(row, "output")
    if fmt == "prompt_completion":
        return _text(row, "prompt") or _text(row, "completion")
    return _text(row, "text")


def convert(row: dict, fmt: str) -> dict:
    """A checked row in the form TRL trains on."""
    if fmt == "messages":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    if fmt == "sharegpt":
        return {"messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]}
    if fmt == "instruction":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}
    if fmt == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    return {"text": row["text"]}
