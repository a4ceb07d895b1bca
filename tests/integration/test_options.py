"""The selectable optimizers train, and W&B can be switched off."""

import json

import pytest
import torch

from finetune.data import load_splits
from finetune.data.tokenize import tokenize
from finetune.lora import build_peft_config
from finetune.model import Device, load_base_model
from finetune.registry import load_config
from finetune.tokenizer import load_tokenizer
from finetune.trainer import build_sft_config, build_trainer


@pytest.mark.slow
@pytest.mark.parametrize("optim,cls,bits", [
    ("adamw_torch", "torch.optim.adamw.AdamW", None),
    ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW", 8),
    ("paged_adamw_32bit", "bitsandbytes.optim.adamw.AdamW", 32),
    ("adafactor", "transformers.optimization.Adafactor", None),
])
def test_each_optimizer_takes_a_step(tiny_args, tmp_path, optim, cls, bits):
    cfg = load_config(tiny_args(tmp_path / "run", f"train.optim={optim}", "lora.r=32"))
    cpu = Device("cpu", "cpu", True, "fp32", torch.float32)
    tokenizer = load_tokenizer(cfg.model)
    from finetune.data.templates import apply_chat_template_choice

    apply_chat_template_choice(tokenizer, None)
    args = build_sft_config(cfg.train, cfg.data, cpu, tmp_path, report_to="none", run_name="t", has_eval=False)
    splits = load_splits(cfg.data, 0)
    train = tokenize(splits.train, tokenizer, cfg.data, "train", splits.conversational).dataset
    trainer = build_trainer(load_base_model(cfg.model, cfg.quant, cpu), tokenizer, train, None,
                            build_peft_config(cfg.lora), args, [])
    optimizer = trainer.create_optimizer()
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    if bits:
        assert optimizer.args.optim_bits == bits
    lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    optimizer.step()
    assert not torch.equal(before, lora_b.detach())


@pytest.mark.slow
def test_wandb_disabled_writes_no_wandb_run_and_the_environment_override_is_said(tiny_args, cli, tmp_path):
    common = ["tracking=wandb", "tracking.mode=disabled", "train.max_steps=2"]
    result = cli(*tiny_args(tmp_path / "off", *common), wandb_mode=None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list((tmp_path / "off").glob("wandb/*run-*"))
    assert (tmp_path / "off" / "metrics.jsonl").read_text().count('"loss"') == 2  # metrics.jsonl regardless
    result = cli(*tiny_args(tmp_path / "env", *common), wandb_mode="offline")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W&B mode offline from WANDB_MODE (tracking.mode=disabled is overridden)" in result.stderr
    assert len(list((tmp_path / "env").glob("wandb/offline-run-*"))) == 1


def changed_share(run_dir, base_dir, name="model.layers.0.mlp.down_proj.weight") -> float:
    """The share of a weight's elements a full fine-tune's saved model/ changed from the base (in the saved dtype)."""
    from safetensors.torch import load_file

    trained, base = (load_file(str(d / "model.safetensors"))[name] for d in (run_dir / "model", base_dir))
    return (trained != base.to(trained.dtype)).float().mean().item()


@pytest.mark.slow
def test_full_fine_tuning_keeps_small_updates_in_mixed_precision_and_loses_them_in_pure_bf16(tiny_args, tiny_model,
                                                                                              cli, tmp_path, caplog):
    """At a small learning rate each AdamW update (about lr) is below half of most weights' bf16 spacing: fp32 master
    weights (the default) add them up, pure bf16 weights round them away (with a warning), and Kahan summation
    (train.optim=adamw_kahan) keeps them with bf16 weights."""
    full = ["lora=off", "quant=none", "train.precision=bf16", "train.learning_rate=1e-5", "train.lr_scheduler=constant",
            "train.warmup_ratio=0", "train.max_steps=8", "train.micro_batch_size=4", "data.eval_max_samples=2"]
    shares = {}
    for name, extra in [("mixed", []), ("pure", ["train.master_weights=16bit", "train.optim=adamw_torch"]),
                        ("kahan", ["train.master_weights=16bit", "train.optim=adamw_kahan"])]:
        caplog.clear()
        result = cli(*tiny_args(tmp_path / name, *full, *extra), wandb_mode=None)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("rounded away" in caplog.text) == (name == "pure")
        shares[name] = changed_share(tmp_path / name, tiny_model)
        optimizer = json.loads((tmp_path / name / "summary.json").read_text())["optimizer"]["class"]
        assert (optimizer == "optimi.adamw.AdamW") == (name == "kahan")
    assert shares["mixed"] > 0.5 and shares["kahan"] > 0.8 * shares["mixed"]
    assert shares["pure"] < shares["mixed"] / 3
