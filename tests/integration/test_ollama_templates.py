"""The Ollama Modelfile's TEMPLATE, rendered by Go's own text/template as Ollama renders it, writes the same text as the
training chat template (rendered by transformers' jinja), for every family of the architecture matrix: multi-turn
conversations with and without a system prompt, contents that a Go template or a Modelfile could misread."""

from __future__ import annotations

import pytest

from finetune import ollama
from finetune.data import formats
from tests.arch_families import FAMILIES, family_tokenizer
from tests.helpers import go_render

pytestmark = pytest.mark.slow  # builds and starts a Go program

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse.\nAnswer in words."},
     {"role": "user", "content": "Write 512 in words."}, {"role": "assistant", "content": "five hundred twelve"},
     {"role": "user", "content": "And 13?"}, {"role": "assistant", "content": "thirteen"},
     {"role": "user", "content": 'Now {{ .Content }} and "\"\"\" quotes", a tab\tand 🚀 é'}],
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts the BOS token before a text itself (as llama.cpp then does from the GGUF)."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """{family: [(jinja text, Go text or error)]} for every conversation, all rendered by one Go process."""
    cases, expected = [], []
    for name, family in FAMILIES.items():
        tokenizer = family_tokenizer(name)
        bos_added = adds_bos(tokenizer)
        template = ollama.go_template(tokenizer, family.fold_system, bos_added)
        for conversation in CONVERSATIONS:
            messages = formats.fold([dict(m) for m in conversation]) if family.fold_system else conversation
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if bos_added and text.startswith(tokenizer.bos_token):
                text = text[len(tokenizer.bos_token):]  # the runtime adds it
            cases.append({"template": template, "messages": conversation})
            expected.append((name, text))
    out = go_render(cases, tmp_path_factory.mktemp("go"))
    by_family: dict = {}
    for (name, text), got in zip(expected, out):
        by_family.setdefault(name, []).append((text, got.get("text", got.get("error"))))
    return by_family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_go_template_renders_the_chat_templates_text(rendered, name):
    for jinja_text, go_text in rendered[name]:
        assert go_text == jinja_text
    assert any("You are terse.\nAnswer in words." in t for t, _ in rendered[name])  # the system prompt is there


def test_a_template_whose_glue_changes_along_the_conversation_is_refused():
    tokenizer = family_tokenizer("llama3_1")
    # a template numbering the user turns: the text before a user message differs from turn to turn
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}[Q{{ loop.index }}] {% endif %}"
                               "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(ollama.NotPortable, match="at the same place"):
        ollama.go_template(tokenizer, False, False)
