"""LoRA config -> peft.LoraConfig, and the trainable-parameter report."""

from __future__ import annotations

from finetune.config import LoraConfig


def build_peft_config(cfg: LoraConfig):
    """The peft.LoraConfig for `cfg`, or None when LoRA is off (full fine-tuning)."""
    import peft

    if not cfg.enabled:
        return None
    targets = list(cfg.target_modules)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        target_parameters=list(cfg.target_parameters) or None,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=list(cfg.modules_to_save) or None,  # none unless asked: vLLM cannot load them
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters. A bitsandbytes 4-bit weight is stored two values per byte, so its
    tensor has half as many elements as the weight it stands for: count the weight."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            n = quant_state.shape.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
