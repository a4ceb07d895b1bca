"""Build the embedded demo: a tiny Llama base model, its tokenizer, and the demo dataset.

    python scripts/build_demo_model.py            # ~10 min on 2 CPU cores

Writes, deterministically from --seed:
  scripts/data/demo_corpus.txt.gz        the pre-training corpus (shipped with the project)
  finetune/assets/tiny_llama/            base model (safetensors), tokenizer, chat template
  finetune/assets/demo_data/*.jsonl      the fine-tuning task: "Write 347 in words." -> "three hundred forty seven"

The corpus teaches the base model English number words in running prose. It never sees the chat
format, so before fine-tuning it cannot answer the instruction (exact match ~0); fine-tuning teaches
it to answer in the chat format and to stop. The eval numbers are held out of the fine-tuning data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "data" / "demo_corpus.txt.gz"
MODEL_DIR = ROOT / "finetune" / "assets" / "tiny_llama"
DATA_DIR = ROOT / "finetune" / "assets" / "demo_data"

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

# Zephyr-style chat template. The assistant turn, its EOS included, sits inside {% generation %} so that
# assistant-only loss trains the model to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
PROMPTS = ["Write {n} in words.", "Spell out the number {n}.", "How do you write {n} in words?", "{n} in words, please."]


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + words(rest))


def make_corpus(rng: random.Random) -> list[str]:
    animals = "cat dog bird fox horse cow sheep duck frog mouse owl bear".split()
    colors = "red blue green yellow black white brown small big old young happy".split()
    places = "garden house field river forest barn hill road market school".split()
    verbs = "sees finds likes follows watches meets helps chases".split()
    things = "apples stones birds books coins trees cups boats stars eggs".split()
    number_forms = [
        "{n} is written {w}.",
        "the number {n} reads {w}.",
        "{w} is the number {n}.",
        "in words, {n} is {w}.",
        "we counted {n} {t}, {w} {t} in all.",
        "there were {w} {t} in the {p}. that is {n} {t}.",
        "{n} {t} means {w} {t}.",
    ]
    docs = []
    for _ in range(4):  # every number, in several phrasings, several times
        for n in range(1000):
            for form in rng.sample(number_forms, 3):
                docs.append(form.format(n=n, w=words(n), t=rng.choice(things), p=rng.choice(places)))
    for _ in range(12000):  # plain prose, so the base is a language model and not a lookup table
        s = []
        for _ in range(rng.randint(1, 3)):
            s.append(
                f"the {rng.choice(colors)} {rng.choice(animals)} {rng.choice(verbs)} the "
                f"{rng.choice(colors)} {rng.choice(animals)} near the {rng.choice(places)}."
            )
        docs.append(" ".join(s))
    rng.shuffle(docs)
    return docs


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits are single tokens, so numbers are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def pretrain(tokenizer, docs: list[str], steps: int, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,  # a multiple of 64: bitsandbytes packs 4-bit CPU weights in 64-wide blocks
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = []
    for d in docs:  # documents joined as <s> text </s>
        ids.extend(tokenizer(d)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    seq, batch = 128, 32
    print(f"corpus: {len(docs)} docs, {len(ids)} tokens; model: {model.num_parameters()} params")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    return model


def write_demo_data(rng: random.Random) -> None:
    numbers = list(range(1000))
    rng.shuffle(numbers)
    eval_numbers, train_numbers = numbers[:100], numbers[100:]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, nums in (("train", train_numbers), ("eval", eval_numbers)):
        with open(DATA_DIR / f"{name}.jsonl", "w") as f:
            for n in nums:
                row = {
                    "messages": [
                        {"role": "user", "content": rng.choice(PROMPTS).format(n=n)},
                        {"role": "assistant", "content": words(n)},
                    ]
                }
                f.write(json.dumps(row) + "\n")


MODEL_CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [finetune, demo]
---
# tiny_llama: the embedded demo base model of finetune

A 0.9M-parameter Llama (4 layers, d=128, BPE vocabulary of 1024) pretrained by scripts/build_demo_model.py
on a synthetic corpus about numbers. It knows number words but not the chat format: the demo recipe
`tiny_qlora` teaches it to answer "Write 347 in words." and to stop.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(args.seed)
    docs = make_corpus(rng)
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(CORPUS, "wt", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    tokenizer = train_tokenizer(docs)
    model = pretrain(tokenizer, docs, args.steps, args.seed)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    (MODEL_DIR / "README.md").write_text(MODEL_CARD)
    write_demo_data(rng)
    for prompt in ("347 is written", "the number 58 reads", "the red fox"):
        x = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=12)
        print(repr(prompt), "->", repr(tokenizer.decode(out[0][x["input_ids"].shape[1] :])))
    print(f"wrote {MODEL_DIR} and {DATA_DIR}")


if __name__ == "__main__":
    main()
