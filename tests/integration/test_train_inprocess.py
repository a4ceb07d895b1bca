"""The train pipeline in-process on a tiny random Llama (the shared tiny run), holding on to the live trainer
to inspect it."""

import pytest
import torch

from tests.helpers import effective_base_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_run):
    """`train` on QLoRA defaults (NF4, paged 8-bit AdamW, checkpointing), with the trainer captured."""
    return tiny_run


def test_the_base_is_bitsandbytes_4bit_nf4(trained):
    import bitsandbytes as bnb

    captured, summary, _ = trained
    layers = [m for m in captured["trainer"].model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    # double quantization (bitsandbytes' CPU kernel unpacks the nested scales and keeps the original flag)
    assert all(m.weight.quant_state.nested or m.weight.quant_state.original_nested for m in layers)
    assert summary["quantized_layers"] == {"Linear4bit": 14}


def test_base_weights_are_unchanged_and_lora_weights_changed(trained):
    captured, _, _ = trained
    model = captured["trainer"].model
    base_after = effective_base_weights(model)
    assert len(base_after) == len(captured["base_before"]) > 14
    for name, before in captured["base_before"].items():
        assert torch.equal(before, base_after[name]), f"frozen base weight {name} changed"
    after = dict(model.named_parameters())
    assert not any(p.requires_grad for n, p in after.items() if "lora_" not in n)
    lora_b = [n for n in after if "lora_B" in n]
    assert lora_b and all(after[n].requires_grad for n in lora_b)
    assert all(not torch.equal(captured["before"][n], after[n].detach()) for n in lora_b)


def test_the_optimizer_is_bitsandbytes_paged_8bit_adamw(trained):
    import bitsandbytes as bnb

    captured, summary, _ = trained
    opt = captured["trainer"].optimizer
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, bnb.optim.AdamW)
    assert inner.args.optim_bits == 8 and inner.is_paged
    states = [s for s in inner.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit state where tensors reach min_8bit_size
    assert summary["optimizer"] == {"class": "bitsandbytes.optim.adamw.AdamW", "optim_bits": 8,
                                    "is_paged": False}  # paged was asked; on a CPU bitsandbytes does not page


def test_gradient_checkpointing_is_on_and_non_reentrant(trained):
    captured, summary, _ = trained
    trainer = captured["trainer"]
    assert trainer.model.is_gradient_checkpointing and summary["gradient_checkpointing"]
    name = "activation_checkpointing" if hasattr(trainer.args, "activation_checkpointing") else "gradient_checkpointing"
    assert getattr(trainer.args, name) is True
    assert getattr(trainer.args, f"{name}_kwargs") == {"use_reentrant": False}


def test_the_loss_falls_and_summary_has_every_key(trained):
    _, summary, run_dir = trained
    for key in ("recipe", "base_model", "quantization", "train_loss", "eval_loss_base", "eval_loss", "train_tokens",
                "train_runtime_s", "tokens_per_second", "peak_memory_gb", "device", "trainable_params",
                "total_params", "gpu_hours"):
        assert key in summary
    assert summary["eval_loss"] < summary["eval_loss_base"]
    assert summary["gpu_hours"] is None and summary["device"] == "cpu"
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["chat_template"] == "plain"
    assert "<unk>" in (run_dir / "adapter" / "tokenizer_config.json").read_text()  # pad token distinct from EOS


def test_the_trained_tokens_are_counted(trained):
    """summary.json's train_tokens (and tokens/s) come from TRL's own count of the tokens it trained on: every
    token of the sequences seen in 16 steps of 8 (an epoch of 91 rows is 12 steps, its last one of 3), padding
    excluded."""
    captured, summary, _ = trained
    lengths = [len(ids) for ids in captured["trainer"].train_dataset["input_ids"]]
    batch, per_epoch = summary["effective_batch"], -(-len(lengths) // summary["effective_batch"])
    seen = len(lengths) * (summary["steps"] // per_epoch) + batch * (summary["steps"] % per_epoch)
    assert isinstance(summary["train_tokens"], int)
    assert seen * min(lengths) <= summary["train_tokens"] <= seen * max(lengths)
    assert summary["tokens_per_second"] == pytest.approx(summary["train_tokens"] / summary["train_runtime_s"])
