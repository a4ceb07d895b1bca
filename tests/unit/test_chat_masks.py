"""Assistant-only masks on the real chat templates of current model families, character by character and token by
token: a three-turn conversation with a system prompt, each reply and its end-of-turn token trained, in the
context inference gives it, and nothing else. Templates come from TRL's package data or are transcribed from
the model's public repository (tests/fixtures/chat_templates/, each naming its source)."""

import pytest

from finetune.data import formats, masks
from finetune.data.tokenize import labelled, tokenize_row
from finetune.errors import UserError
from tests.helpers import chat_template, trained_runs, with_template

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You're welcome."}]
REPLIES = ["Hello!", "4", "You're welcome."]

# Worked out from each template's text: the token that ends a reply, and whether the template renders earlier
# turns as it rendered them when each was the last (one sequence), or not (one sequence per turn: Qwen3 drops
# the empty thinking block from earlier turns, gpt-oss ends the final message with <|return|> and earlier ones
# with <|end|>). Mistral v0.3 drops the system prompt once a reply follows it: it is folded into the first user
# turn (data.system_prompt=fold, which the error says, below).
FAMILIES = {
    "llama3": ("<|eot_id|>", False), "llama3_1": ("<|eot_id|>", False), "llama3_2": ("<|eot_id|>", False),
    "qwen2_5": ("<|im_end|>", False), "qwen3": ("<|im_end|>", True), "qwen3_instruct_2507": ("<|im_end|>", False),
    "qwen3_5_nothink": ("<|im_end|>", True), "qwen3_5_think": ("<|im_end|>", True), "qwen3_6": ("<|im_end|>", True),
    "qwen3_8": ("<|im_end|>", False), "gemma3": ("<end_of_turn>", False), "gemma4": ("<turn|>", False),
    "gemma4_v5": ("<turn|>", False), "phi3": ("<|end|>", False), "phi3_5": ("<|end|>", False),
    "gptoss": ("<|return|>", True), "cohere": ("<|END_OF_TURN_TOKEN|>", False),
    "cohere2": ("<|END_RESPONSE|>", False), "lfm2": ("<|im_end|>", False), "lfm2_2_5": ("<|im_end|>", False),
    "mistral_v0_3": ("</s>", False), "smollm2": ("<|im_end|>", False),
}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return lambda: AutoTokenizer.from_pretrained(tiny_model)


def tokenizer_for(base_tokenizer, family: str):
    return with_template(base_tokenizer(), chat_template(family))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_reply_and_its_end_of_turn_token_are_trained_in_their_inference_context(base_tokenizer, family):
    eot, per_turn = FAMILIES[family]
    tok = tokenizer_for(base_tokenizer, family)
    conversation = formats.fold(list(CONVERSATION)) if family == "mistral_v0_3" else CONVERSATION
    assert masks.end_of_turn_token(tok) == eot
    sequences = masks.sequences(tok, conversation, None)
    assert len(sequences) == (3 if per_turn else 1)
    spans = [(seq, span) for seq in sequences for span in seq.spans]
    assert [seq.text[a:b] for seq, (a, b) in spans] == [r + eot for r in REPLIES]  # the reply and its end, nothing else
    turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    for k, (seq, (a, _)) in zip(turns, spans):  # what precedes a reply is exactly the prompt inference gives
        assert seq.text[:a] == masks.inference_prompt(tok, conversation[:k])


@pytest.mark.parametrize("family", ["llama3_1", "qwen3", "gemma3", "smollm2", "gptoss"])
def test_the_trained_tokens_are_the_replies_token_by_token(base_tokenizer, family):
    eot, _ = FAMILIES[family]
    tok = tokenizer_for(base_tokenizer, family)
    trained = trained_runs(tokenize_row({"messages": CONVERSATION}, tok, train_on_inputs=False))
    assert [tok.decode(r) for r in trained] == [r + eot for r in REPLIES]
    assert all(r[-1] == tok.convert_tokens_to_ids(eot) for r in trained)  # every reply ends on the stop token


def test_only_the_last_turn_with_data_turns_last(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "qwen3")
    (seq,) = masks.sequences(tok, CONVERSATION, None, turns="last")
    assert [seq.text[a:b] for a, b in seq.spans] == ["You're welcome.<|im_end|>"]
    assert seq.text == tok.apply_chat_template(CONVERSATION, tokenize=False)


def test_reasoning_is_trained_where_the_template_puts_it(base_tokenizer):
    row = formats.convert({"messages": [{"role": "user", "content": "2+2?"},
                                        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]},
                          "messages")
    expected = {"qwen3": "<think>\nTwo and two.\n</think>\n\n4<|im_end|>",  # the model opens its thinking block
                "qwen3_5_think": "Two and two.\n</think>\n\n4<|im_end|>",  # the prompt opens it (<think>\n)
                "gptoss": "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final"
                          "<|message|>4<|return|>"}
    for family, trained in expected.items():
        messages, tools = formats.chat(row)
        (seq,) = masks.sequences(tokenizer_for(base_tokenizer, family), messages, tools)
        assert [seq.text[a:b] for a, b in seq.spans] == [trained], family


def test_tool_calls_are_trained_and_tool_results_are_not(base_tokenizer):
    row = formats.convert({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}, "messages")
    messages, tools = formats.chat(row)
    (seq,) = masks.sequences(tokenizer_for(base_tokenizer, "qwen2_5"), messages, tools)
    assert "<tools>" in seq.text and "sunny" in seq.text  # the schemas and the result are in the context
    assert [seq.text[a:b] for a, b in seq.spans] == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', "Sunny.<|im_end|>"]


def test_a_system_prompt_the_template_drops_is_one_clear_error_naming_the_remedy(base_tokenizer):
    with pytest.raises(UserError, match="If it is the system message .* data.system_prompt=fold"):
        masks.sequences(tokenizer_for(base_tokenizer, "mistral_v0_3"), CONVERSATION, None)


def test_a_template_that_cannot_be_masked_is_one_clear_error(base_tokenizer):
    """DeepSeek-R1's distills prefill <think> in the prompt but render replies without it: no reply can be trained
    in the context inference gives it."""
    tok = with_template(base_tokenizer(), chat_template("deepseek_r1_distill").replace("<｜", "<|").replace("｜>", "|>"))
    with pytest.raises(UserError, match="assistant replies cannot be located .*data.train_on_inputs=true"):
        masks.sequences(tok, CONVERSATION, None)


def test_a_template_that_refuses_a_row_says_so_in_its_own_words(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "gemma")  # Gemma 2: no system role
    with pytest.raises(masks.RowProblem, match="the chat template refuses it: System role not supported"):
        masks.sequences(tok, CONVERSATION, None)
    (seq,) = masks.sequences(tok, formats.fold(list(CONVERSATION)), None)  # data.system_prompt=fold
    assert "Be brief.\n\nHi" in seq.text and [seq.text[a:b] for a, b in seq.spans] == [r + "<end_of_turn>" for r in REPLIES]


def test_generation_marks_are_cross_checked(base_tokenizer, caplog):
    """Where a template marks replies ({% generation %}), the marks must cover what the rendering says a reply is."""
    import logging

    from finetune.data.templates import TEMPLATES
    from finetune.data.tokenize import cross_check

    row = {"messages": CONVERSATION}
    tok = base_tokenizer()
    for name in TEMPLATES:
        tok.chat_template = TEMPLATES[name].jinja
        if name in ("plain", "llama2", "mistral"):  # the others need tokens this vocabulary lacks
            cross_check(tok, row, "all")
    tok.chat_template = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '### Assistant:\\n' + m['content'] }}"
                         "{% generation %}{{ eos_token }}{% endgeneration %}{{ '\\n' }}{%- else -%}{{ m['content'] + '\\n' }}"
                         "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}")
    with pytest.raises(UserError, match="generation %} marks and its rendering disagree"):
        cross_check(tok, row, "all")  # the marks leave the reply's text out
    with caplog.at_level(logging.INFO, logger="finetune"):
        tok.chat_template = tok.chat_template.replace("{{ '### Assistant:\\n' + m['content'] }}{% generation %}",
                                                      "{% generation %}{{ '### Assistant:\\n' + m['content'] }}")
        cross_check(tok, row, "all")  # marks over the header too: said, not trained
    assert "marks also cover" in caplog.text


def test_the_offsets_decide_which_tokens_are_trained(base_tokenizer):
    tok = base_tokenizer()
    seq = masks.Sequence("the red fox", ((4, 7),))
    out = labelled(tok, seq)
    assert tok.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]).strip() == "red"


def test_reasoning_a_template_does_not_render_is_said(base_tokenizer, caplog):
    import logging

    import datasets

    from finetune.data.tokenize import reasoning_check

    rows = datasets.Dataset.from_list([formats.convert({"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]},
        "messages")])
    with caplog.at_level(logging.WARNING, logger="finetune"):
        reasoning_check(tokenizer_for(base_tokenizer, "qwen3"), rows, "train", 10**6)
        assert not caplog.records  # Qwen3 renders it
        reasoning_check(tokenizer_for(base_tokenizer, "llama3_1"), rows, "train", 10**6)
    assert "the chat template does not render the assistant turns' reasoning" in caplog.text


# TRL's templates without a correct mask, and why: each is one clear message, never a wrong mask.
UNMASKABLE = {
    "deepseek_r1_distill": "renders it once the reply follows",  # prompt prefills <think>, replies drop it
    "deepseekv3": "renders it once the reply follows", "glm4moe": "starts with no special token",  # turns end unmarked
    "nemotron_3_5_lightning": "renders it once the reply follows", "nemotron_3_nano": "renders it once the reply follows",
    "nemotron_3_super": "renders it once the reply follows", "nemotron_3_ultra": "renders it once the reply follows",
    "idefics3": "exactly once", "smolvlm": "exactly once",  # vision templates: text content is not a reply
    "llava_next": "refuses it",
    "gemma": "System role not supported",  # Gemma 2: masked exactly with data.system_prompt=fold (above)
}


def test_every_template_trl_bundles_is_masked_exactly_or_refused_clearly(base_tokenizer):
    """A new template in TRL fails this test until someone looks at it."""
    from pathlib import Path

    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    for path in sorted(p for p in folder.glob("*.jinja") if not p.stem.endswith("training")):
        template = path.read_text().replace("<\uff5c", "<|").replace("\uff5c>", "|>")  # DeepSeek's full-width bars
        tok = with_template(base_tokenizer(), template)
        if path.stem in UNMASKABLE:
            with pytest.raises((UserError, masks.RowProblem), match=UNMASKABLE[path.stem]):
                masks.sequences(tok, CONVERSATION, None)
            continue
        eot = masks.end_of_turn_token(tok)
        trained = [seq.text[a:b] for seq in masks.sequences(tok, CONVERSATION, None) for a, b in seq.spans]
        assert trained == [r + eot for r in REPLIES], path.stem
