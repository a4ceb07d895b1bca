"""The Ollama Modelfile's text: FROM, TEMPLATE, a stop parameter per stop token, SYSTEM when every training
conversation shares one system prompt; Go string literals Ollama's parser keeps whole."""

import pytest

from finetune import ollama
from finetune.errors import UserError


def conversation(system=None):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def test_the_system_prompt_is_the_one_every_conversation_shares():
    assert ollama.shared_system_prompt([conversation("Be brief."), conversation("Be brief.")]) == "Be brief."
    assert ollama.shared_system_prompt([conversation("Be brief."), conversation("Be long.")]) is None
    assert ollama.shared_system_prompt([conversation("Be brief."), conversation()]) is None
    assert ollama.shared_system_prompt([conversation(), conversation()]) is None


def test_the_modelfile_names_the_file_template_stops_and_system():
    text = ollama.modelfile("run-q4_k_m.gguf", '{{ "<|user|>" }}{{ .Content }}', ["<|im_end|>", "</s>"], "Be brief.")
    assert text.splitlines()[0] == "FROM ./run-q4_k_m.gguf"
    assert 'TEMPLATE """{{ "<|user|>" }}{{ .Content }}"""' in text
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "</s>"' in text and text.endswith('SYSTEM """Be brief."""\n')
    assert "SYSTEM" not in ollama.modelfile("f.gguf", "t", ["</s>"], None)


def test_a_triple_quote_which_would_end_a_modelfile_string_is_refused():
    with pytest.raises(UserError, match='would contain """'):
        ollama.modelfile("f.gguf", "t", ["</s>"], 'say """hi"""')


def test_go_string_literals_are_printable_ascii():
    assert ollama.go_string('a"b\\c\nd\té🚀') == '"a\\"b\\\\c\\nd\\u0009\\u00e9\\U0001f680"'
    assert ollama.emit("") == ""
