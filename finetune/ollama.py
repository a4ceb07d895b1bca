"""Ollama: gguf/Modelfile, whose TEMPLATE writes the same text as the training chat template, in Go's text/template.

Ollama renders a Modelfile's TEMPLATE with Go's text/template over the conversation (`.Messages`, each with `.Role`
and `.Content`). The Go template is derived from the run's chat template by rendering it: conversations whose
contents are unique markers are rendered as training and `generate` render them (the system prompt folded into the
first user turn where data.system_prompt=fold), and the text between two markers is what the template writes
between a message of one role and the next. A template whose text between two roles changes along the conversation
(or that drops a message) cannot be written this way and is refused, naming why. The BOS token is left to the
runtime where its tokenizer adds one (as llama.cpp does when the GGUF says add_bos_token), so it is not written twice.
tests/integration/test_gguf.py renders every family's template with Go's own text/template and compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from finetune.data import formats
from finetune.errors import UserError

ROLES = ("system", "user", "assistant")
# conversations the template is derived from: every turn Ollama sends ends with a user message, then the generation
# prompt; with and without a system prompt, one turn and several
PROBES = (("system", "user", "assistant", "user", "assistant", "user"), ("user", "assistant", "user"), ("user",),
          ("system", "user"))


def marker(i: int) -> str:
    return f"QZXMARK{i}XQZ"  # letters and digits only: survives `| trim`, escaping and capitalisation-free templates


def render(tokenizer, roles: tuple, fold: bool) -> str:
    messages = [{"role": r, "content": marker(i)} for i, r in enumerate(roles)]
    if fold:
        messages = formats.fold(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def segments(tokenizer, fold: bool) -> dict:
    """{(kind, role[, role]): text}: what the template writes before the first message ("head", its role),
    between two messages ("glue", the roles) and after the last one, the generation prompt included ("tail")."""
    found: dict = {}
    for roles in PROBES:
        text, keys = render(tokenizer, roles, fold), [("head", roles[0])]
        keys += [("glue", a, b) for a, b in zip(roles, roles[1:])] + [("tail", roles[-1])]
        pieces, rest = [], text
        for i in range(len(roles)):
            before, sep, rest = rest.partition(marker(i))
            if not sep:
                raise NotPortable(f"the {roles[i]} message of a {'/'.join(roles)} conversation is not in its rendering")
            pieces.append(before)
        for key, piece in zip(keys, pieces + [rest]):
            if found.setdefault(key, piece) != piece:
                raise NotPortable(f"it writes {found[key]!r} and elsewhere {piece!r} at the same place ({' '.join(key)})")
    return found


class NotPortable(Exception):
    """The chat template cannot be written as an Ollama TEMPLATE (the reason)."""


def go_string(text: str) -> str:
    """A Go string literal of `text` in printable ASCII (Ollama's Modelfile parser drops other unprintable runes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def emit(text: str) -> str:
    return "{{ " + go_string(text) + " }}" if text else ""


def go_template(tokenizer, fold: bool, bos_added: bool) -> str:
    """The Go template of the tokenizer's chat template (raises NotPortable). `bos_added`: the runtime adds the
    BOS token itself, so the template does not write it."""
    found = segments(tokenizer, fold)
    bos = tokenizer.bos_token or ""
    heads = {k[1]: v[len(bos):] if bos_added and bos and v.startswith(bos) else v
             for k, v in found.items() if k[0] == "head"}
    lines = ['{{- $prev := "" }}', "{{- range .Messages }}"]
    branches = [f'$prev "") (eq .Role "{role}")' for role in heads]
    texts = list(heads.values())
    for (kind, *roles), text in found.items():
        if kind == "glue":
            branches.append(f'$prev "{roles[0]}") (eq .Role "{roles[1]}")')
            texts.append(text)
    for i, (cond, text) in enumerate(zip(branches, texts)):
        lines.append("{{- " + ("if" if i == 0 else "else if") + f" and (eq {cond} }}}}" + emit(text))
    lines += ["{{- end }}{{ .Content }}{{ $prev = .Role }}", "{{- end }}"]
    tails = [(k[1], v) for k, v in found.items() if k[0] == "tail"]
    for i, (role, text) in enumerate(tails):
        lines.append("{{- " + ("if" if i == 0 else "else if") + f' eq $prev "{role}" }}}}' + emit(text))
    lines.append("{{- end }}")
    return "\n".join(lines)


def stop_tokens(tokenizer, eos_ids: list[int]) -> list[str]:
    """The text of every token a reply ends at (the template's end-of-turn token and every EOS)."""
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in eos_ids if i is not None))


def shared_system_prompt(rows) -> Optional[str]:
    """The system prompt every training conversation starts with, if they all share one."""
    prompts = set()
    for row in rows:
        messages = formats.chat(row)[0] if "messages" in row else []
        prompts.add(messages[0]["content"] if messages and messages[0]["role"] == "system" else None)
        if len(prompts) > 1:
            return None
    return next(iter(prompts), None)


def modelfile(gguf_name: str, template: str, stops: list[str], system: Optional[str]) -> str:
    """The Modelfile's text: FROM the GGUF beside it, the TEMPLATE, a stop parameter per stop token, the SYSTEM
    prompt where there is one."""
    for name, text in (("TEMPLATE", template), ("SYSTEM", system or "")):
        if '"""' in text:
            raise UserError(f"The Modelfile's {name} would contain \"\"\", which ends a Modelfile string: remove it "
                            "from the system prompt or chat template.")
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer, eos_ids: list[int], fold: bool, bos_added: bool,
                    rows) -> Optional[str]:
    """gguf/Modelfile (for `ollama create`), and the same template, stop tokens and system prompt as the files
    `ollama run hf.co/REPO:LEVEL` reads from a Hub repository (template, params, system). Returns None, or the reason
    they cannot be written (the chat template has no Go equivalent)."""
    try:
        template = go_template(tokenizer, fold, bos_added)
    except NotPortable as e:
        return f"no Ollama Modelfile: the chat template cannot be written in Go's template language ({e})"
    stops, system = stop_tokens(tokenizer, eos_ids), shared_system_prompt(rows)
    (folder / "Modelfile").write_text(modelfile(gguf_name, template, stops, system))
    (folder / "template").write_text(template)
    (folder / "params").write_text(json.dumps({"stop": stops}, indent=2) + "\n")
    if system:
        (folder / "system").write_text(system)
    return None
