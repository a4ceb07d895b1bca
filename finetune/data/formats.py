"""Row formats: detection from every row's keys, per-row checks, and conversion to what TRL trains on.

    messages           {"messages": [{"role", "content"}, ...], "tools"?}      -> messages (assistant-only loss)
    sharegpt           {"conversations": [{"from", "value"}, ...]}             -> messages
    instruction        {"instruction", "input" (optional), "output"}           -> messages (loss on the output)
    prompt_completion  {"prompt", "completion"}                                -> prompt/completion (loss on the completion)
    text               {"text"}                                                -> text (loss on everything)
    preference         {"prompt", "chosen", "rejected"} as text                -> a pair (train.objective=dpo|orpo)
    preference_chat    {"prompt"?, "chosen", "rejected"} as conversations      -> a pair of replies to one prompt

Preference rows are TRL's preference format: the prompt and the two answers, plain text or conversations (the
prompt's messages, and each answer as one assistant message; without a prompt, "chosen" and "rejected" are whole
conversations that share every message but their last, the answer).

Conversations are read as users find them in public data: content as text or as a list of text parts
(OpenAI's), a `reasoning_content` or `thinking` field on assistant turns, and tool calls in OpenAI's format
(assistant `tool_calls`, role `tool` answering them, the row's `tools` schemas), which the chat template
renders. A check returns (reason, detail) for a bad row: the reason is what the counts of dropped rows are
grouped by, the detail names the field.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional

ROLES = ("system", "user", "assistant", "tool")
REASONING = ("reasoning_content", "thinking")  # the names templates read reasoning under (Qwen3 / gpt-oss)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_chat": ("chosen", "rejected"),
}
FORMATS = list(REQUIRED)  # also the order in which a tie between formats is broken
CONVERSATIONAL = {"messages", "sharegpt", "instruction"}  # SFT rows trained as conversations
PREFERENCE = {"preference", "preference_chat"}  # pairs for train.objective=dpo|orpo; the others are for sft
EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "instruction": '{"instruction": "Translate to French", "input": "cat", "output": "chat"}',
    "prompt_completion": '{"prompt": "The capital of France is", "completion": " Paris."}',
    "text": '{"text": "Any text to continue pre-training on."}',
    "preference": '{"prompt": "Write 947 in words.", "chosen": "nine hundred forty seven", "rejected": "947"}',
    "preference_chat": '{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": '
                       '"Hello! How can I help?"}], "rejected": [{"role": "assistant", "content": "What?"}]}',
}
Problem = Optional[tuple[str, str]]


def rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns ({our name: the dataset's name}) to a row."""
    if not columns or not isinstance(row, dict):
        return row
    theirs = {v: k for k, v in columns.items()}
    return {theirs.get(k, k): v for k, v in row.items()}


def fits(row: dict, fmt: str) -> bool:
    """Whether `row` has every field `fmt` requires (a preference pair: as text or as conversations)."""
    if not all(k in row for k in REQUIRED[fmt]):
        return False
    if fmt in PREFERENCE:
        return isinstance(row["chosen"], list) == (fmt == "preference_chat")
    return True


def detect(rows: list, columns: dict[str, str]) -> tuple[str, Counter]:
    """The format most rows have every required field of (ties: the first in FORMATS), and the counts."""
    counts: Counter = Counter()
    for row in rows:
        row = rename(row, columns)
        if isinstance(row, dict):
            counts.update(f for f in REQUIRED if fits(row, f))
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


def text_of(content) -> Optional[str]:
    """Message content as text: a string, or OpenAI's list of text parts joined; None if it is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _tool_calls(calls, where: str) -> Problem:
    """OpenAI's tool calls: [{"type": "function", "function": {"name", "arguments": object or JSON text}}]."""
    if not isinstance(calls, list) or not calls:
        return ("wrong type", f"{where} 'tool_calls' must be a non-empty list")
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] and isinstance(args, dict)):
            return ("bad tool call", f"{where} tool_calls[{j}] needs a function name and its arguments as an object")
    return None


def _message(messages: list, i: int, field: str = "messages") -> Problem:
    m, where = messages[i], f"{field}[{i}]"
    if not isinstance(m, dict) or "role" not in m:
        return ("missing field", f"{where} must be an object with 'role' and 'content'")
    role = m["role"]
    if role not in ROLES:
        return ("unknown role", f"{where} has role {role!r}; allowed: {', '.join(ROLES)}")
    reasoning = [k for k in REASONING if m.get(k) is not None]
    if reasoning and role != "assistant":
        return ("reasoning not on a reply", f"{where} ({role}) has '{reasoning[0]}': reasoning belongs to assistant turns")
    if any(not isinstance(m[k], str) for k in reasoning):
        return ("wrong type", f"{where} (assistant) has a non-text '{reasoning[0]}'")
    if m.get("tool_calls") is not None:
        if role != "assistant":
            return ("tool call not on a reply", f"{where} ({role}) has 'tool_calls': only assistant turns call tools")
        problem = _tool_calls(m["tool_calls"], f"{where} (assistant)")
        if problem:
            return problem
    text = text_of(m.get("content"))
    if text is None and not (role == "assistant" and m.get("tool_calls") and m.get("content") in (None, "")):
        return ("empty field", f"{where} ({role}) has empty or non-text 'content' (text, or a list of text parts)")
    if text is not None and not text.strip() and not m.get("tool_calls"):
        return ("empty field", f"{where} ({role}) has empty or non-text 'content'")
    if role == "tool" and not _answers_a_call(messages, i):
        return ("tool result without a call", f"{where} (tool) answers no tool call of an earlier assistant turn")
    return None


def _answers_a_call(messages: list, i: int) -> bool:
    """A tool message follows (after other tool messages) an assistant turn with tool calls, matching an id if given."""
    j = i - 1
    while j >= 0 and messages[j].get("role") == "tool":
        j -= 1
    calls = messages[j].get("tool_calls") if j >= 0 and messages[j].get("role") == "assistant" else None
    if not calls:
        return False
    wanted = messages[i].get("tool_call_id")
    return wanted is None or any(isinstance(c, dict) and c.get("id") == wanted for c in calls)


def _messages(messages, field: str) -> Problem:
    if not isinstance(messages, list) or not messages:
        return ("wrong type", f"field '{field}' must be a non-empty list of {{role, content}} objects")
    return next(filter(None, (_message(messages, i, field) for i in range(len(messages)))), None)


def _tools(row: dict) -> Problem:
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return ("wrong type", "field 'tools' must be a list of tool schemas (objects)")
    return None


def _conversation(row: dict) -> Problem:
    problem = _messages(row["messages"], "messages")
    if problem:
        return problem
    if not any(m["role"] == "assistant" for m in row["messages"]):
        return ("no assistant turn", "has no assistant message, so there is nothing to learn")
    return _tools(row)


def _text_pair(row: dict) -> Problem:
    problem = _text(row, "prompt") or _text(row, "chosen") or _text(row, "rejected")
    if not problem and row["chosen"].strip() == row["rejected"].strip():
        return ("identical pair", "has the same 'chosen' and 'rejected' text: there is nothing to prefer")
    return problem


def split_pair(row: dict) -> tuple[list, dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of a checked conversational pair, its prompt explicit (a list
    of messages) or shared by both sides (UltraFeedback's rows also carry the prompt as text: the sides are read)."""
    if isinstance(row.get("prompt"), list):
        return row["prompt"], row["chosen"][0], row["rejected"][0]
    return row["chosen"][:-1], row["chosen"][-1], row["rejected"][-1]


def _chat_pair(row: dict) -> Problem:
    explicit = isinstance(row.get("prompt"), list)
    fields = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    problem = next(filter(None, (_messages(row[f], f) for f in fields)), None) or _tools(row)
    if problem:
        return problem
    if explicit:
        side = next((f for f in ("chosen", "rejected") if len(row[f]) != 1), None)
        if side:
            return ("not one reply", f"field '{side}' has {len(row[side])} messages: with a 'prompt', each side is "
                    "one assistant message")
    else:
        chosen, rejected = row["chosen"], row["rejected"]
        if len(chosen) < 2:
            return ("no prompt", "has no 'prompt', and 'chosen' is one message: give a 'prompt' (a list of "
                    "messages), or whole conversations on both sides")
        differ = next((i for i in range(max(len(chosen), len(rejected)) - 1)
                       if i >= min(len(chosen), len(rejected)) - 1 or stored(chosen[i]) != stored(rejected[i])), None)
        if differ is not None:
            return ("prompts differ", f"'chosen' and 'rejected' differ at message {differ}, before their last one: "
                    "both sides must be the same conversation up to the answer")
    prompt, chosen, rejected = split_pair(row)
    if prompt[-1]["role"] not in ("user", "tool"):
        return ("prompt ends with a reply", f"the prompt's last message is {prompt[-1]['role']!r}: it must end "
                "with the user (or tool) turn the answers reply to")
    wrong = next(((f, m["role"]) for f, m in (("chosen", chosen), ("rejected", rejected)) if m["role"] != "assistant"),
                 None)
    if wrong:
        return ("answer not a reply", f"the '{wrong[0]}' answer has role {wrong[1]!r}: answers are assistant messages")
    if stored(chosen) == stored(rejected):
        return ("identical pair", "has the same 'chosen' and 'rejected' answer: there is nothing to prefer")
    return None


def check(row, fmt: str) -> Problem:
    """Why `row` cannot be trained on as `fmt`, or None."""
    if not isinstance(row, dict):
        return ("not an object", f"is a {type(row).__name__}, not an object")
    missing = [k for k in REQUIRED[fmt] if k not in row]
    if missing:
        return ("missing field", f"has no '{missing[0]}' field (it has {', '.join(map(repr, row)) or 'no fields'})")
    if fmt == "messages":
        return _conversation(row)
    if fmt == "sharegpt":
        problem = _turns(row["conversations"], "conversations", "from", "value", list(SHAREGPT_ROLES))
        if not problem and not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in row["conversations"]):
            problem = ("no assistant turn", "has no gpt/assistant turn, so there is nothing to learn")
        return problem
    if fmt == "instruction":
        return _text(row, "instruction") or _text(row, "input", optional=True) or _text(row, "output")
    if fmt == "prompt_completion":
        return _text(row, "prompt") or _text(row, "completion")
    if fmt == "preference":
        return _text_pair(row)
    if fmt == "preference_chat":
        return _chat_pair(row)
    return _text(row, "text")


def convert(row: dict, fmt: str, fold_system: bool = False) -> dict:
    """A checked row in the form it is stored and trained on. Conversations keep only the fields a template reads,
    tool-call arguments and tool schemas as JSON text (a dataset column holds one type); `chat` undoes that.
    fold_system: a system message goes into the first user turn (for templates that refuse a system role)."""
    if fmt == "messages":
        out = {"messages": fold([stored(m) for m in row["messages"]]) if fold_system else
               [stored(m) for m in row["messages"]]}
        return out | ({"tools": json.dumps(row["tools"])} if row.get("tools") else {})
    if fmt == "sharegpt":
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return {"messages": fold(messages) if fold_system else messages}
    if fmt == "instruction":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}
    if fmt == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if fmt == "preference":
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if fmt == "preference_chat":
        prompt, chosen, rejected = split_pair(row)
        prompt = [stored(m) for m in prompt]
        return ({"prompt": fold(prompt) if fold_system else prompt, "chosen": [stored(chosen)],
                 "rejected": [stored(rejected)]} | ({"tools": json.dumps(row["tools"])} if row.get("tools") else {}))
    return {"text": row["text"]}


def stored(m: dict) -> dict:
    """A message as the dataset keeps it: role, content text, and the optional fields only where present."""
    out = {"role": m["role"], "content": text_of(m.get("content")) or ""}
    reasoning = next((m[k] for k in REASONING if m.get(k) is not None), None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if m.get("tool_calls"):
        out["tool_calls"] = [stored_call(c) for c in m["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = str(m[key])
    return out


def stored_call(call: dict) -> dict:
    fn = call.get("function", call)
    args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
    return {"type": "function", "id": str(call.get("id", "")), "function": {"name": fn["name"], "arguments": args}}


def fold(messages: list[dict]) -> list[dict]:
    """The system message's text put before the first user turn's (for templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        return rest
    rest[first] = rest[first] | {"content": f"{system}\n\n{rest[first]['content']}"}
    return rest


def chat(row: dict) -> tuple[list[dict], Optional[list]]:
    """(messages, tools) of a stored conversation, as chat templates read them: fields a row lacks are absent
    (not null), tool-call arguments are objects again, reasoning is under both names templates use."""
    messages = []
    for m in row["messages"]:
        m = {k: v for k, v in m.items() if v is not None and v != ""} | {"content": m.get("content") or ""}
        if m.get("reasoning_content") is not None:
            m["thinking"] = m["reasoning_content"]
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", **({"id": c["id"]} if c.get("id") else {}),
                                "function": {"name": c["function"]["name"],
                                             "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        messages.append(m)
    return messages, json.loads(row["tools"]) if row.get("tools") else None
