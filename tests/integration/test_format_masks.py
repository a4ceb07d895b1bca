"""What TRL actually trains on, token by token, for each format: the collated labels of a real batch."""

import json

import pytest
import torch

from finetune.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
)
from finetune.data import load_splits
from finetune.data.templates import apply_chat_template_choice
from finetune.data.tokenize import tokenize
from finetune.lora import build_peft_config
from finetune.model import Device, load_base_model
from finetune.tokenizer import load_tokenizer
from finetune.trainer import build_sft_config, build_trainer

ROWS = {
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    "instruction": {"instruction": "Greet", "input": "me", "output": "Hello!"},
    "prompt_completion": {"prompt": "Say hello:", "completion": " Hello!"},
    "text": {"text": "Hello world."},
}
# what the labels keep: the reply or completion and the stop token; everything for raw text
TRAINED = {
    "messages": "Hello!</s>", "sharegpt": "Hello!</s>", "instruction": "Hello!</s>",
    "prompt_completion": " Hello!</s>", "text": "Hello world.</s>",
}
FULL = {
    "messages": "### User:\nHi\n\n### Assistant:\nHello!</s>\n\n",
    "instruction": "### User:\nGreet\n\nme\n\n### Assistant:\nHello!</s>\n\n",
}


def collated(tiny_model, tmp_path, fmt, train_on_inputs=False):
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(ROWS[fmt]) + "\n") * 4)
    data = DataConfig(path=str(path), eval_fraction=0, max_length=64, train_on_inputs=train_on_inputs)
    model_cfg = ModelConfig(name_or_path=str(tiny_model))
    cpu = Device("cpu", "cpu", True, "fp32", torch.float32)
    tokenizer = load_tokenizer(model_cfg)
    apply_chat_template_choice(tokenizer, None)
    splits = load_splits(data, seed=0)
    tokenized = tokenize(splits.train, tokenizer, data, "train", splits.conversational)
    args = build_sft_config(TrainConfig(), data, cpu, tmp_path / "ckpt", "none", "t", tokenizer.eos_token)
    model = load_base_model(model_cfg, QuantConfig(method="none", double_quant=False), cpu)
    trainer = build_trainer(model, tokenizer, tokenized.dataset, None, build_peft_config(LoraConfig()), args, [])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return tokenizer, ids, labels


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_only_the_reply_and_its_stop_token_are_trained(tiny_model, tmp_path, fmt):
    tokenizer, ids, labels = collated(tiny_model, tmp_path, fmt)
    trained = labels != -100
    assert tokenizer.decode(ids[trained]) == TRAINED[fmt]
    assert int(ids[trained][-1]) == tokenizer.eos_token_id  # the model learns to stop
    assert torch.equal(labels[trained], ids[trained])  # labels are the tokens themselves (the model shifts them)
    if fmt in FULL:
        assert tokenizer.decode(ids) == "<s>" + FULL[fmt]
    assert (ids == tokenizer.bos_token_id).sum() <= 1


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_train_on_inputs_trains_every_token(tiny_model, tmp_path, fmt):
    _, ids, labels = collated(tiny_model, tmp_path, fmt, train_on_inputs=True)
    assert torch.equal(labels, ids)
