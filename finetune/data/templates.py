"""Bundled chat templates, for base models whose tokenizer has none or to train in a known format.

Each marks the assistant's reply, its end-of-turn token included, with {% generation %} so that TRL's
assistant-only loss trains exactly the reply and the token that stops it. The template used in training
is saved with the adapter's tokenizer (and the merged model's), so inference formats prompts exactly as
training did. A template whose end-of-turn token is not the tokenizer's EOS makes it the EOS, so that
generation stops there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune.errors import UserError, closest

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Template:
    jinja: str
    stop: str | None = None        # the end-of-turn token; None: the tokenizer's own EOS
    needs: tuple[str, ...] = ()    # tokens that must be single tokens of the vocabulary
    about: str = ""


# The first system message, split off; `system` is '' when there is none.
_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
)

TEMPLATES = {
    "plain": Template(
        about="plain text markers and the tokenizer's BOS/EOS: for base models, no new tokens to learn",
        jinja=(
            "{{ bos_token }}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
            "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ '### Assistant:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
        ),
    ),
    "chatml": Template(
        about="<|im_start|>role ... <|im_end|> (Qwen, many open chat models); needs those tokens",
        stop="<|im_end|>",
        needs=("<|im_start|>", "<|im_end|>"),
        jinja=(
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}"
            "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
            "{%- else -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
        ),
    ),
    "llama2": Template(
        about="Llama-2-chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] reply </s>, BOS and EOS only",
        jinja=(
            _SYSTEM
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if loop.first and system -%}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
            "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
            "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{% generation %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endgeneration %}"
            "{%- endif -%}"
            "{%- endfor -%}"
        ),
    ),
    "llama3": Template(
        about="Llama-3-instruct headers, <|eot_id|> ends a turn; needs the Llama-3 special tokens",
        stop="<|eot_id|>",
        needs=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        jinja=(
            "{{ bos_token }}"
            "{%- for message in messages -%}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{%- if message['role'] == 'assistant' -%}"
            "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
            "{%- else -%}{{ message['content'] + '<|eot_id|>' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
        ),
    ),
    "mistral": Template(
        about="Mistral-instruct v0.1: <s>[INST] user [/INST]reply</s>, system text before the first user turn",
        jinja=(
            "{{ bos_token }}"
            + _SYSTEM
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
            "{%- endif -%}"
            "{%- endfor -%}"
        ),
    ),
}


def apply_chat_template_choice(tokenizer, name: str | None) -> str:
    """Set the tokenizer's chat template: one of its own named variants, a bundled one by name, else its own, else
    'plain'. Returns which.

    A bundled template with its own end-of-turn token becomes the tokenizer's EOS (so generation stops
    there); its special tokens must already be single tokens of the vocabulary: new tokens would need
    trained embeddings, which LoRA on the linear layers does not give.
    """
    own = tokenizer.chat_template
    if isinstance(own, dict):  # named variants (Hermes-3, Command-R): one of them is the run's template
        variant = name if name in own else ("default" if name is None else None)
        if variant in own:
            tokenizer.chat_template = own[variant]
            return f"tokenizer ({variant})"
        if name is None:
            raise UserError(f"The tokenizer has named chat templates ({', '.join(own)}) and none is 'default': choose "
                            "one with data.chat_template=NAME.")
    elif name is None:
        if own:
            return "tokenizer"
        log.info("The tokenizer has no chat template; using the bundled 'plain' one (set data.chat_template to choose).")
        name = "plain"
    if name not in TEMPLATES:
        variants = f"; the tokenizer's own: {', '.join(own)}" if isinstance(own, dict) else ""
        raise UserError(f"data.chat_template={name} is not a bundled template: choose one of {', '.join(TEMPLATES)}"
                        f"{variants}, or null for the tokenizer's own.{closest(name, [*TEMPLATES, *(own or [])])}")
    return use_bundled(tokenizer, name)


def use_bundled(tokenizer, name: str) -> str:
    template = TEMPLATES[name]
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.needs if t not in vocab]
    if missing:
        raise UserError(f"data.chat_template={name} needs the tokens {', '.join(missing)}, which this tokenizer does "
                        "not have as single tokens (new tokens would need trained embeddings). Use plain, llama2 or "
                        "mistral, which need only BOS and EOS, or null for the tokenizer's own template.")
    tokenizer.chat_template = template.jinja
    if template.stop:
        make_eos(tokenizer, template.stop)
    return name


def make_eos(tokenizer, token: str) -> None:
    """`token` ends a reply: it becomes the EOS that generation stops at (the pad token stays distinct)."""
    from finetune.tokenizer import ensure_pad_token

    if token != tokenizer.eos_token:
        tokenizer.eos_token = token
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            ensure_pad_token(tokenizer)


def use_end_of_turn(tokenizer) -> str:
    """For conversations: the template's end-of-turn token (Llama-3's <|eot_id|>, Gemma's <end_of_turn>, Phi's
    <|end|>) becomes the EOS, so that generation stops where training taught the reply to end. Returns it."""
    from finetune.data import masks

    token = masks.end_of_turn_token(tokenizer)
    if token != tokenizer.eos_token:
        log.info("chat template: replies end with %s, which becomes the EOS (was %s)", token, tokenizer.eos_token)
        make_eos(tokenizer, token)
    return token
