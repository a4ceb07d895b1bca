"""Tiny random-weight replicas of the model families users fine-tune today, each with its family's real chat
template and special tokens: two layers, a hidden width of 64 (bitsandbytes' CPU 4-bit kernels quantize in blocks
of 64), the family's own shape features (GQA, rope scaling, tied or untied embeddings, sliding windows, hybrid
linear attention, mixture-of-experts) kept at toy sizes.

The templates are TRL's copies (trl/chat_templates/) or transcribed into tests/fixtures/chat_templates/, each
naming its source; the special tokens are those of each model's tokenizer_config.json on the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# initializer_range 0.2 (real models: 0.02) spreads a random head's logits wide enough for six LoRA steps to make a
# reply its greedy answer.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2)


@dataclass(frozen=True)
class Family:
    model_type: str              # transformers' config model_type (AutoConfig.for_model)
    template: str                # chat_template(NAME): TRL's copy or a fixture
    eot: str                     # the token that ends an assistant turn, which generation must stop at
    bos: str | None
    eos: str
    pad: str | None
    config: dict = field(default_factory=dict)  # the family's shape, on top of SMALL
    fold_system: bool = False    # the template moves the system prompt: data.system_prompt=fold
    extra: tuple = ()            # other special tokens of the real vocabulary that the pipeline looks for
    reply_sep: str = ""          # what the template writes between the prompt and a reply (trained where a token
    #                              joins it to the reply's first characters: " 4" is one token)


FAMILIES = {
    # meta-llama/Llama-3.1-8B-Instruct: GQA, llama3 rope scaling, untied head
    "llama3_1": Family("llama", "llama3_1", "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", None, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)), extra=("<|finetune_right_pad_id|>",)),
    # meta-llama/Llama-3.2-1B-Instruct: the same, with tied embeddings
    "llama3_2": Family("llama", "llama3_2", "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", None, dict(
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)), extra=("<|finetune_right_pad_id|>",)),
    # mistralai/Ministral-8B-Instruct-2410 (model_type ministral: interleaved sliding-window layers)
    "ministral": Family("ministral", "mistral_v0_3", "</s>", "<s>", "</s>", None, dict(
        sliding_window=32, layer_types=["sliding_attention", "full_attention"]), fold_system=True, reply_sep=" "),
    # Qwen/Qwen2.5-7B-Instruct: qkv biases
    "qwen2": Family("qwen2", "qwen2_5", "<|im_end|>", None, "<|im_end|>", "<|endoftext|>", dict(
        head_dim=None, num_attention_heads=4)),
    # Qwen/Qwen3-8B: q/k norms
    "qwen3": Family("qwen3", "qwen3", "<|im_end|>", None, "<|im_end|>", "<|endoftext|>"),
    # Qwen/Qwen3-30B-A3B-Instruct-2507: a mixture of experts under every layer (its template: Qwen3's)
    "qwen3_moe": Family("qwen3_moe", "qwen3", "<|im_end|>", None, "<|im_end|>", "<|endoftext|>", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    # Qwen/Qwen3.5-9B (text): hybrid Gated DeltaNet linear attention and gated full attention
    "qwen3_5": Family("qwen3_5_text", "qwen3_5_nothink", "<|im_end|>", None, "<|im_end|>", "<|endoftext|>", dict(
        layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4)),
    # Qwen/Qwen3.5-35B-A3B (text): the same attention, a mixture of experts with a shared expert
    "qwen3_5_moe": Family("qwen3_5_moe_text", "qwen3_5_nothink", "<|im_end|>", None, "<|im_end|>", "<|endoftext|>",
                          dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                               linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)),
    # google/gemma-3-1b-it: sliding and global layers, tied embeddings, scaled embeddings
    "gemma3": Family("gemma3_text", "gemma3", "<end_of_turn>", "<bos>", "<eos>", "<pad>", dict(
        sliding_window=32, layer_types=["sliding_attention", "full_attention"])),
    # google/gemma-4-31B-it (text): sliding and global layers, no per-layer embeddings
    "gemma4": Family("gemma4_text", "gemma4", "<turn|>", "<bos>", "<eos>", "<pad>", dict(
        sliding_window=32, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
        per_layer_config={})),
    # microsoft/Phi-4-mini-instruct (model_type phi3): fused qkv and gate_up projections, partial rotary
    "phi3": Family("phi3", "phi3", "<|end|>", "<s>", "<|endoftext|>", "<|endoftext|>", dict(
        head_dim=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75),
        tie_word_embeddings=True)),
    # HuggingFaceTB/SmolLM3-3B: no rope on every 4th layer, tied embeddings
    "smollm3": Family("smollm3", "smollm3", "<|im_end|>", None, "<|im_end|>", None, dict(
        head_dim=None, no_rope_layer_interval=2)),
    # allenai/Olmo-3-7B-Instruct: post-norm, q/k norms, sliding and full layers. Its template ends the last reply
    # with the EOS (<|endoftext|>), earlier ones with <|im_end|>: each reply trains in its own sequence, ending in EOS
    "olmo3": Family("olmo3", "olmo3", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<|pad|>", dict(
        head_dim=None, sliding_window=32, layer_types=["sliding_attention", "full_attention"])),
    # openai/gpt-oss-20b: mixture of experts, attention sinks, yarn rope, sliding and full layers
    "gpt_oss": Family("gpt_oss", "gptoss", "<|return|>", "<|startoftext|>", "<|return|>", "<|endoftext|>", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"])),
}


def tiny_config(family: Family, vocab_size: int, ids: dict):
    from transformers import AutoConfig

    kwargs = {**SMALL, **family.config, "vocab_size": vocab_size, **ids}
    if kwargs["head_dim"] is None:  # the family derives it from the width and the heads
        del kwargs["head_dim"]
    return AutoConfig.for_model(family.model_type, **kwargs)


def family_tokenizer(name: str):
    """A small BPE tokenizer trained here, with the family's chat template, its special tokens (single tokens, as in
    the real vocabulary) and its BOS, EOS and pad."""
    from tests.helpers import chat_template, trained_tokenizer, with_template

    family = FAMILIES[name]
    specials = [t for t in (family.bos, family.eos, family.pad, family.eot, *family.extra) if t]
    tokenizer = with_template(trained_tokenizer(specials), chat_template(family.template))
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = family.bos, family.eos, family.pad
    return tokenizer


def build_family(name: str, path: Path, config: dict | None = None) -> Path:
    """The tiny replica of FAMILIES[name] saved in `path` (safetensors, tokenizer with the chat template); `config`
    replaces some of its sizes."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    family, tokenizer = FAMILIES[name], family_tokenizer(name)
    if config:
        family = dataclasses.replace(family, config={**family.config, **config})
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(family.eos),
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), ids))
    model.to(torch.bfloat16).save_pretrained(path)  # as the Hub's checkpoints are
    tokenizer.save_pretrained(path)
    return path
