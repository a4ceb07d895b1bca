"""Where a model, its tokenizer or a dataset comes from (a local folder or a Hub id), and the tokenizer.

Both the data stage and the model stage need this, and data needs nothing else from the model side: it
formats and tokenizes rows with a tokenizer. So it lives here, and finetune/data/ never imports model.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from finetune.config import ModelConfig
from finetune.errors import UserError

log = logging.getLogger("finetune")

# Tokens that can pad without being EOS, in the order tried. Padding is masked out of the loss by the
# attention mask, but a distinct pad token also keeps generation and other tools from confusing the two.
PAD_CANDIDATES = ["<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"]


def is_local_path(name: str) -> bool:
    """A path on this machine rather than a Hugging Face Hub id."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def base_model_id(model: ModelConfig) -> Optional[str]:
    """The base model as other machines can find it: its Hub id, or model.hub_id for a local copy."""
    if model.hub_id:
        return model.hub_id
    return None if is_local_path(model.name_or_path) else model.name_or_path


def check_model_path(cfg: ModelConfig) -> None:
    """A local model.name_or_path / model.tokenizer must be a folder (with config.json for the model)."""
    for key, value in (("model.name_or_path", cfg.name_or_path), ("model.tokenizer", cfg.tokenizer)):
        if value and is_local_path(value):
            path = Path(value).expanduser()
            if not path.is_dir():
                raise UserError(f"{key}={value}: no such folder. Give a local folder holding config.json, "
                                "or a Hugging Face Hub id such as meta-llama/Llama-2-7b-hf.")
            if key == "model.name_or_path" and not (path / "config.json").is_file():
                raise UserError(f"{key}={value}: the folder has no config.json, so it is not a transformers model.")


def hub_load_error(key: str, name: str, e: Exception) -> UserError:
    """A model or tokenizer that from_pretrained could not load -> one message saying what to check."""
    first = str(e).strip().split("\n")[0]
    return UserError(f"{key}={name}: could not be loaded ({type(e).__name__}: {first}). Check the Hub id and your "
                     "network; for gated models (Llama, Mistral) accept the licence on huggingface.co and run "
                     "`hf auth login`; or give a local folder.")


_warned_remote_code: set = set()


def warn_remote_code(cfg: ModelConfig) -> None:
    """model.trust_remote_code=true runs Python code from the checkpoint: say so, once per model."""
    if cfg.trust_remote_code and cfg.name_or_path not in _warned_remote_code:
        _warned_remote_code.add(cfg.name_or_path)
        log.warning("model.trust_remote_code=true: the Python code shipped with %s will run on this machine. Keep it "
                    "for repositories you trust.", cfg.name_or_path)


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token distinct from EOS where its vocabulary allows; returns what was done."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos:
        return f"kept {tokenizer.pad_token}"
    vocab = tokenizer.get_vocab()
    for token in [tokenizer.unk_token] + PAD_CANDIDATES:
        if token and token in vocab and vocab[token] != eos:
            tokenizer.pad_token = token
            return f"set to {token}"
    tokenizer.pad_token = tokenizer.eos_token
    log.warning("The tokenizer has no token to pad with but EOS; padding with EOS (padding is masked by the "
                "attention mask, so EOS is still trained).")
    return f"EOS ({tokenizer.eos_token}): no other candidate"


def load_tokenizer(cfg: ModelConfig):
    """The base model's tokenizer (model.tokenizer, else model.name_or_path), with an EOS and a pad token."""
    from transformers import AutoTokenizer

    check_model_path(cfg)
    name = cfg.tokenizer or cfg.name_or_path
    warn_remote_code(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise hub_load_error("model.tokenizer" if cfg.tokenizer else "model.name_or_path", name, e) from None
    if tokenizer.eos_token is None:
        raise UserError(f"The tokenizer of {name} has no EOS token, so a tuned model could never learn to stop.")
    ensure_pad_token(tokenizer)
    return tokenizer
