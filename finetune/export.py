"""Export: adapter/ always; merged/ on request, by reloading the base in 16-bit and merging with PEFT.

Merging into 4-bit weights would round the merged weights back to NF4 and lose most of the adapter's
update, so the base is always reloaded unquantized. The merge is checked: logits of the merged model
must match the same 16-bit base with the adapter unmerged, and are compared with the model as trained.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import torch

from finetune.config import ExportConfig, FinetuneConfig, QuantConfig
from finetune.errors import UserError
from finetune.model import DTYPES, Device, load_base_model

CHECK_TOKENS = 128  # tokens of each check sample: enough to compare distributions, cheap on a CPU


def check_batches(tokenizer, rows, n: int) -> list[torch.Tensor]:
    """Token ids of the first n eval rows, as formatted in training."""
    from finetune.data.tokenize import tokenize_row

    # train_on_inputs=True: the same tokens as in training, without asking the template for assistant masks
    return [torch.tensor([tokenize_row(row, tokenizer, train_on_inputs=True)["input_ids"][:CHECK_TOKENS]])
            for row in list(rows)[:n]]


@torch.no_grad()
def logits_of(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=b.to(device)).logits.float().cpu() for b in batches]


def compare_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """Largest |logit| difference (absolute and relative to the largest |logit|), and mean KL(a || b) per token."""
    max_abs = max((x - y).abs().max().item() for x, y in zip(a, b))
    scale = max(x.abs().max().item() for x in a)
    kl = torch.cat([
        torch.nn.functional.kl_div(y.log_softmax(-1), x.log_softmax(-1), log_target=True, reduction="none").sum(-1).flatten()
        for x, y in zip(a, b)
    ]).mean().item()
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_abs / max(scale, 1e-9), "mean_kl": kl}


def write_model_card(path: Path, cfg: FinetuneConfig, summary: dict, merged: bool) -> None:
    load = (
        'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")'
        if merged else
        f'base = AutoModelForCausalLM.from_pretrained("{cfg.model.name_or_path}")\n'
        f'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_FOLDER")'
    )
    figures = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in summary.items() if k in (
            "eval_loss_base", "eval_loss", "exact_match_base", "exact_match", "train_loss", "train_tokens",
            "train_runtime_s", "device", "trainable_params", "merge_max_rel_logit_diff", "merge_vs_trained_mean_kl")
        and v is not None
    )
    text = f"""---
base_model: {cfg.model.name_or_path}
library_name: {'transformers' if merged else 'peft'}
tags: [finetune, {'qlora' if cfg.quant.method == 'nf4' else 'lora'}, sft]
---
# {'Merged model' if merged else 'LoRA adapter'}: {cfg.recipe}

Fine-tuned from `{cfg.model.name_or_path}` with finetune, recipe `{cfg.recipe}`:
base in {cfg.quant.method}, LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, on `{cfg.data.path or ", ".join(s.path for s in cfg.data.sources)}`.
Prompts must use the chat template saved with the tokenizer here, as in training.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{'from peft import PeftModel' if not merged else ''}
{load}
```

| figure | value |
| --- | --- |
{figures}
"""
    (path / "README.md").write_text(text)


def save_adapter(trainer, tokenizer, adapter_dir: Path) -> None:
    """adapter_config.json, adapter_model.safetensors, tokenizer files with the training chat template."""
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))


def export_merged(cfg: FinetuneConfig, adapter_dir: Path, merged_dir: Path, tokenizer, batches: list[torch.Tensor],
                  trained_logits: Optional[list[torch.Tensor]]) -> dict:
    """Reload the base in export.merge_dtype on the CPU, merge the adapter, save, and check the logits.

    The merge runs in CPU memory, so it never needs more GPU memory than training did.
    """
    from peft import PeftModel

    ex: ExportConfig = cfg.export
    dtype = DTYPES[ex.merge_dtype]
    cpu = Device("cpu", "cpu", True, "fp32", dtype)
    base = load_base_model(cfg.model, QuantConfig(method="none", double_quant=False), cpu, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    unmerged = logits_of(model, batches)
    model = model.merge_and_unload()
    merged = logits_of(model, batches)
    fidelity = {f"merge_{k}": v for k, v in compare_logits(unmerged, merged).items()}
    if trained_logits is not None:
        fidelity.update({f"merge_vs_trained_{k}": v for k, v in compare_logits(trained_logits, merged).items()})
    if fidelity["merge_max_rel_logit_diff"] > ex.check_tolerance:
        raise UserError(
            f"The merged model's logits differ from base + adapter by {fidelity['merge_max_rel_logit_diff']:.3g} "
            f"(relative), more than export.check_tolerance={ex.check_tolerance}. The adapter in {adapter_dir} is "
            "intact; try export.merge_dtype=float32."
        )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    (merged_dir / "fidelity.json").write_text(json.dumps(fidelity, indent=2))
    del model, base
    gc.collect()
    return fidelity
