"""Bundled chat templates, for base models whose tokenizer has none.

Each marks the assistant's reply, its EOS included, with {% generation %} so that TRL's assistant-only
loss trains exactly the reply and the stop token. The template used in training is saved with the
adapter's tokenizer, so inference formats prompts exactly as training did.
"""

from __future__ import annotations

import logging

from finetune.errors import UserError

log = logging.getLogger("finetune")

TEMPLATES = {
    # A plain-text format for base models: no new tokens to learn, only the tokenizer's own BOS and EOS.
    "plain": (
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
}


def apply_chat_template_choice(tokenizer, name: str | None) -> str:
    """Set the tokenizer's chat template: a bundled one by name, else its own, else 'plain'. Returns which."""
    if name is not None:
        if name not in TEMPLATES:
            raise UserError(f"data.chat_template={name} is not a bundled template: choose one of {', '.join(TEMPLATES)}.")
        tokenizer.chat_template = TEMPLATES[name]
        return name
    if tokenizer.chat_template:
        return "tokenizer"
    log.info("The tokenizer has no chat template; using the bundled 'plain' one (set data.chat_template to choose).")
    tokenizer.chat_template = TEMPLATES["plain"]
    return "plain"
