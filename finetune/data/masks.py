"""Assistant-only masks from the chat template itself: which characters of a rendered conversation are trained.

The rule: each assistant reply, and the end-of-turn token that stops generation, are trained; nothing else is.
Not the header the template writes before a reply, not scaffolding it inserts by itself (Qwen3's empty
`<think>` block, gpt-oss's final channel), not the separators after the end-of-turn token. And each reply
is trained in exactly the context inference gives it.

It is found by rendering, so any template works, with or without `{% generation %}` marks:
- For assistant turn k, the prompt inference would give (the turns before it, with the generation prompt)
  must be a prefix of the conversation rendered through turn k; what follows is the turn.
- A placeholder reply rendered in its place shows the template's own markup before and after a reply. The
  markup after starts with the end-of-turn token (a special token, maybe after whitespace).
- The whole conversation is rendered once. Where every turn appears in it exactly as rendered for its own
  inference context, that one sequence is trained with every reply marked. Where the template renders
  history differently (Qwen3 drops thinking blocks from earlier turns), data.turns decides: each reply in
  its own sequence (all), or only the last reply (last).
Where a template marks replies with {% generation %}, the two are cross-checked (finetune.data.tokenize).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from finetune.errors import UserError

PLACEHOLDER = "\u2063FINETUNE_REPLY\u2063"  # invisible separators: no template or tokenizer touches them


class RowProblem(Exception):
    """This conversation cannot be rendered by the template (its own raise_exception, or a broken row)."""


@dataclass(frozen=True)
class Sequence:
    text: str
    spans: tuple[tuple[int, int], ...]   # character spans of `text` that are trained


def render(tokenizer, messages: list[dict], tools: Optional[list], generation_prompt: bool) -> str:
    """The template's text for these messages; a template's raise_exception is a RowProblem in its own words."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise RowProblem(f"the chat template refuses it: {str(e).strip()}") from None


def template_problem(why: str, system: bool = False) -> UserError:
    fold = (" If it is the system message (some templates move it, or drop it once a reply follows), "
            "data.system_prompt=fold puts it into the first user turn." if system else "")
    return UserError(f"The chat template's assistant replies cannot be located ({why}), so no correct "
                     f"assistant-only mask can be derived.{fold} Otherwise set data.chat_template to a bundled one, "
                     "or train on every token with data.train_on_inputs=true.")


def end_of_turn(tokenizer, after: str) -> str:
    """The end-of-turn token at the start of `after` (the markup following a reply), after any spaces: the longest
    special token it starts with."""
    stripped = after.lstrip(" ")
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    token = max((t for t in specials if t and stripped.startswith(t)), key=len, default=None)
    if token is None:
        raise template_problem(f"a reply is followed by {after[:30]!r}, which starts with no special token that "
                               "could end generation")
    return token


def end_of_turn_token(tokenizer) -> str:
    """The token the template ends an assistant reply with, from a placeholder exchange."""
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render(tokenizer, messages, None, True)
    placeholder = render(tokenizer, messages + [{"role": "assistant", "content": PLACEHOLDER}], None, False)
    if not placeholder.startswith(prompt) or placeholder.count(PLACEHOLDER) != 1:
        raise template_problem("the generation prompt is not how the template begins an assistant turn")
    return end_of_turn(tokenizer, placeholder.split(PLACEHOLDER)[1])


@dataclass(frozen=True)
class Turn:
    text: str            # the conversation rendered through this turn
    start: int           # the trained span of `text`: the reply and its end-of-turn token
    end: int


def turn(tokenizer, messages: list[dict], k: int, tools: Optional[list]) -> Turn:
    """Assistant turn k, as its inference context renders it."""
    prompt = render(tokenizer, messages[:k], tools, True)
    text = render(tokenizer, messages[:k + 1], tools, False)
    placeholder = render(tokenizer, messages[:k] + [{"role": "assistant", "content": PLACEHOLDER}], tools, False)
    if not (text.startswith(prompt) and placeholder.startswith(prompt)):
        raise template_problem("the conversation before a reply, with the generation prompt, is not how the template "
                               "renders it once the reply follows", system=messages[0]["role"] == "system")
    if placeholder.count(PLACEHOLDER) != 1:
        raise template_problem("a reply's text does not appear in its rendering exactly once")
    before, after = placeholder[len(prompt):].split(PLACEHOLDER)
    reply = text[len(prompt):]
    if not reply.endswith(after):
        raise template_problem(f"the markup after a reply changes with the reply ({after[:30]!r} expected)")
    start = len(prompt) + (len(before) if reply.startswith(before) else 0)  # reasoning: the template puts it first
    eot = end_of_turn(tokenizer, after)
    return Turn(text, start, len(text) - len(after) + after.index(eot) + len(eot))


def sequences(tokenizer, messages: list[dict], tools: Optional[list], turns: str = "all") -> list[Sequence]:
    """The sequences to train on for one conversation, with their trained spans (see the module's rule)."""
    ks = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    whole = render(tokenizer, messages, tools, False)
    parts = [turn(tokenizer, messages, k, tools) for k in (ks if turns == "all" else ks[-1:])]
    if all(whole.startswith(t.text[:t.end]) for t in parts):  # history renders as each turn did: one sequence
        return [Sequence(whole, tuple((t.start, t.end) for t in parts))]
    return [Sequence(t.text, ((t.start, t.end),)) for t in parts]


def inference_prompt(tokenizer, messages: list[dict], tools: Optional[list] = None, reasoning: bool = False) -> str:
    """The text to generate the next assistant turn from, as training conditioned replies on it: the generation
    prompt, and for a model trained without reasoning the markup the template puts before a plain reply (Qwen3's
    empty thinking block: what enable_thinking=false adds)."""
    prompt = render(tokenizer, messages, tools, True)
    if reasoning:
        return prompt
    placeholder = render(tokenizer, messages + [{"role": "assistant", "content": PLACEHOLDER}], tools, False)
    before = placeholder[len(prompt):].split(PLACEHOLDER)[0] if placeholder.startswith(prompt) else ""
    return prompt + before
