"""LoRA config -> peft.LoraConfig, the adapter a run starts from (init_from), and the trainable-parameter report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig, LoraConfig
from finetune.errors import UserError

log = logging.getLogger("finetune")


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


def as_peft_applies_it(cfg: LoraConfig, model):
    """build_peft_config(cfg) as PEFT applies it to `model` (its meta-device skeleton will do). On transformers 5,
    PEFT maps the per-expert linear names of the mixtures of experts that transformers fuses (Qwen3-MoE, Mixtral, ...;
    all-linear included) to the fused 3-D expert weights and the router's weight, adapted as parameters (the fused
    gate_up at twice the rank); None when LoRA is off."""
    config = build_peft_config(cfg)
    if config is None:
        return None
    try:
        from peft.utils.transformers_weight_conversion import (convert_peft_config_for_transformers,
                                                               get_model_conversion_mapping)
    except ImportError:  # a PEFT that does not convert
        return config
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    return config


def adapted_parameters(cfg: LoraConfig, model) -> list[tuple[str, tuple, float]]:
    """(name, shape, rank / lora.r) of each weight LoRA adapts as a parameter (PEFT's ParamWrapper): those
    lora.target_parameters names, and those PEFT adds for a mixture of experts."""
    import re

    config = as_peft_applies_it(cfg, model)
    wanted = list(getattr(config, "target_parameters", None) or [])
    ranks = getattr(config, "rank_pattern", None) or {}
    def rank(name):
        return next((v for pattern, v in ranks.items() if re.search(pattern + "$", name)), cfg.r) / cfg.r

    return [(name, tuple(p.shape), rank(name)) for name, p in model.named_parameters()
            if any(name == w or name.endswith("." + w) for w in wanted)]


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


def same_model(a: str, b: str) -> bool:
    """Whether two bases are one model: the same Hub id or folder, or two folders with the same config and weight
    files (a copy, the bundled demo model of another checkout)."""
    if a == b:
        return True
    folders = [Path(x) for x in (a, b)]
    if not all((f / "config.json").is_file() for f in folders):
        return False

    def weights(f: Path) -> list:
        return sorted((w.name, w.stat().st_size) for w in f.glob("*.safetensors"))

    return (folders[0] / "config.json").read_bytes() == (folders[1] / "config.json").read_bytes() and \
        weights(folders[0]) == weights(folders[1])


def initial_adapter(cfg: FinetuneConfig) -> Optional[Path]:
    """init_from=RUN_DIR: that finished run's adapter/, which this run trains further on the same base. Its LoRA
    settings become this run's (cfg.lora: the adapter's shape cannot change), as config.yaml then records."""
    if not cfg.init_from:
        return None
    from finetune.export import local_base
    from finetune.run import Run

    run = Run.open(cfg.init_from)
    adapter = run.adapter_dir
    if not run.cfg.lora.enabled:
        raise UserError(f"init_from={cfg.init_from} trained every weight (lora.enabled=false), so it has no adapter "
                        f"to continue: start from its model instead, model.name_or_path={run.model_dir}")
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"init_from={cfg.init_from} has no adapter/ (adapter_config.json): the run did not finish. "
                        f"Finish it with python -m finetune recipe={run.cfg.recipe} output_dir={run.dir} resume=true.")
    if not same_model(local_base(run.cfg.model), local_base(cfg.model)):
        raise UserError(f"init_from={cfg.init_from} trained its adapter on {run.cfg.model.name_or_path}, and this run "
                        f"loads {cfg.model.name_or_path}: an adapter only fits the base it was trained on. Set "
                        f"model.name_or_path={run.cfg.model.name_or_path}.")
    if run.cfg.lora != cfg.lora:
        log.info("init_from: the adapter's LoRA settings are %s's (r=%d, alpha=%g)", run.dir, run.cfg.lora.r,
                 run.cfg.lora.alpha)
    cfg.lora = run.cfg.lora
    return adapter
