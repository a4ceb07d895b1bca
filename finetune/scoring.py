"""How a model is scored on eval rows: the loss on their trained tokens, and greedy answers to their prompts.

One home for both, used in training (the base before, the tuned model after), by `eval` (every precision)
and by export's fidelity check. Answers are generated through the tokenizer's chat template and scored by
exact match (surrounding whitespace ignored; an answer that runs on past the reference does not match) and,
where a recipe names one, a task metric.
"""

from __future__ import annotations

import math
import re
import time
from typing import Optional

import torch

from finetune.config import DataConfig, EvalConfig
from finetune.errors import UserError

# (key, name in the table and chart, name in the model card, format): what `eval` measures, as it is shown
MEASURES = [("loss", "loss", "loss", "{:.4f}"), ("perplexity", "ppl", "perplexity", "{:.3g}"),
            ("exact_match", "exact", "exact match", "{:.3f}"),
            ("preference_accuracy", "prefers", "preference accuracy", "{:.3f}"),
            ("preference_margin", "margin", "preference margin (nats)", "{:.3g}"),
            ("task_accuracy", "task", "task accuracy", "{:.3f}"),
            ("agreement", "agree w/ none", "answers as unquantized", "{:.3f}"),
            ("agreement_original", "agree w/ orig", "answers as the original's", "{:.3f}"),
            ("weights_gb", "weights GB", "weights (GB)", "{:.4f}"), ("tokens_per_second", "tok/s", "tokens/s", "{:,.0f}"),
            ("gpu_hours", "GPU-h", "GPU-hours to make", "{:.3g}"), ("gpu_hours_total", "GPU-h in all", "GPU-hours in all", "{:.3g}")]


def measures_of(rows: list) -> list:
    """The MEASURES some row has a figure for."""
    return [m for m in MEASURES if any(r and r.get(m[0]) is not None for r in rows)]


def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)


# ---- the loss -----------------------------------------------------------------------------------

def nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The summed next-token cross-entropy over the labelled tokens (labels != -100), and their count."""
    target = labels[:, 1:]
    keep = target != -100
    if not keep.any():
        return 0.0, 0
    return (torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep], reduction="sum").item(),
            int(keep.sum()))


def mean_loss(logits: list[torch.Tensor], samples: list[dict]) -> float:
    """Mean next-token loss over the trained tokens of all samples, from their logits; an error over none."""
    sums = [nll(x, s["labels"]) for x, s in zip(logits, samples)]
    count = sum(n for _, n in sums)
    if not count:
        raise UserError("A loss over zero trained tokens is not a figure: the samples have no labelled token.")
    return sum(total for total, _ in sums) / count


def padded(items: list[dict], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels of tokenized rows, right-padded to the longest."""
    width = max(len(t["input_ids"]) for t in items)
    ids = [t["input_ids"] + [pad] * (width - len(t["input_ids"])) for t in items]
    mask = [[1] * len(t["input_ids"]) + [0] * (width - len(t["input_ids"])) for t in items]
    labels = [t["labels"] + [-100] * (width - len(t["labels"])) for t in items]
    return (torch.tensor(ids, device=device), torch.tensor(mask, device=device), torch.tensor(labels, device=device))


@torch.no_grad()
def eval_loss(model, tokenizer, rows, data: DataConfig, batch_size: int, desc: str) -> dict:
    """Mean next-token loss over the trained tokens of every row (token-weighted), and its perplexity."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = loss_items(tokenizer, rows, data)
    total, count = 0.0, 0
    bar = progress(len(items), desc)
    for start in range(0, len(items), batch_size):
        ids, mask, labels = padded(items[start:start + batch_size], pad, device)
        batch_total, batch_count = nll(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
        total, count = total + batch_total, count + batch_count
        bar.update(len(ids))
    bar.close()
    return loss_figures(total, count, desc, data.max_length)


def loss_items(tokenizer, rows, data: DataConfig) -> list[dict]:
    """The input_ids and labels of every row's sequences, as training saw them (dropped or cut at data.max_length)."""
    from finetune.data.tokenize import tokenize_row

    return [{k: t[k][:data.max_length] for k in ("input_ids", "labels")}
            for r in rows for t in tokenize_row(r, tokenizer, data.train_on_inputs, data.turns)
            if t["length"] <= data.max_length or data.too_long != "drop"]


def loss_figures(total: float, count: int, desc: str, max_length: int) -> dict:
    """Loss and perplexity from the summed loss over `count` trained tokens."""
    if not count:
        raise UserError(f"{desc}: the eval rows have no trained token within data.max_length={max_length}, so "
                        "there is no loss to measure.")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}


# ---- preference pairs ---------------------------------------------------------------------------

@torch.no_grad()
def pair_logps(model, pairs, pad: int, batch_size: int, max_length: Optional[int] = None) -> tuple[list, list]:
    """Each pair's summed log-probability of its chosen and of its rejected answer given the prompt, from
    finetune.data.pairs' tokens, batched as TRL's DPO collator batches them (cut at max_length as in training)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)
    device, chosen, rejected = next(model.parameters()).device, [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate([{k: list(pairs[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                         for i in range(start, min(start + batch_size, len(pairs)))])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token = logps.gather(-1, ids[:, 1:, None])[..., 0] * batch["completion_mask"][:, 1:].to(device)
        c, r = token.sum(-1).cpu().chunk(2)
        chosen, rejected = chosen + c.tolist(), rejected + r.tolist()
    return chosen, rejected


def preference_figures(chosen: list, rejected: list) -> dict:
    """How much the model itself prefers the chosen answers: the share of pairs whose chosen answer is the more
    likely (preference accuracy), and the mean log-probability margin chosen - rejected, in nats."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins), "pairs": len(margins)}


# ---- greedy answers -----------------------------------------------------------------------------

def prompt_and_reference(row: dict) -> tuple[tuple, str]:
    """A stored conversation's prompt, (the messages before its last assistant turn, its tools), and that turn's
    text."""
    from finetune.data.formats import chat

    messages, tools = chat(row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return (messages[:last], tools), messages[last]["content"]


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[tuple], max_new_tokens: int, batch_size: int,
                     lengths: list | None = None, progress=None, reasoning: bool = False) -> list[str]:
    """Greedy completions of each (messages, tools) prompt, formatted as training conditioned replies
    (finetune.data.masks.inference_prompt; `reasoning`: the model was trained to think first). `lengths` (a
    list) receives each answer's generated tokens, its EOS included; `progress` (a tqdm bar) is advanced by
    each batch."""
    from finetune.data.masks import inference_prompt

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    answers = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [inference_prompt(tokenizer, messages, tools, reasoning)
                       for messages, tools in conversations[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if lengths is not None:
                eos = tokenizer.eos_token_id
                lengths.extend(row.index(eos) + 1 if eos in row else len(row) for row in new.tolist())
            if progress is not None:
                progress.update(len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def answers_across_processes(model, tokenizer, conversations: list[tuple], max_new_tokens: int,
                             batch_size: int, reasoning: bool = False) -> list[str]:
    """generate_answers, with the conversations split between the processes of a DDP run (each holds the whole
    model) and the answers gathered in order. Every process gets as many (the last padded with repeats), so
    all make the same number of generate calls and reach the gather together."""
    from finetune import distributed

    w = distributed.world()
    if not w.distributed or not conversations:
        return generate_answers(model, tokenizer, conversations, max_new_tokens, batch_size, reasoning=reasoning)
    per = -(-len(conversations) // w.size)
    mine = conversations[w.rank * per:(w.rank + 1) * per]
    answers = generate_answers(model, tokenizer, mine + [conversations[0]] * (per - len(mine)), max_new_tokens, batch_size,
                               reasoning=reasoning)
    everyone = distributed.gather(answers)
    return [a for r in range(w.size) for a in everyone[r * per:r * per + len(conversations[r * per:(r + 1) * per])]]


def exact_match(model, tokenizer, rows, max_new_tokens: int, batch_size: int, reasoning: bool = False) -> dict:
    """Share of rows whose greedy answer equals the reference exactly, and the first few examples (in training:
    the processes of a DDP run share the rows)."""
    pairs = [prompt_and_reference(r) for r in rows]
    answers = answers_across_processes(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, reasoning)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs)]
    examples = [{"prompt": p[0][-1]["content"], "reference": ref, "answer": a}
                for a, (p, ref) in list(zip(answers, pairs))[:5]]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits), "examples": examples}


def scored_answers(model, tokenizer, rows, cfg: EvalConfig, desc: str, reasoning: bool = False) -> dict:
    """Greedy answers to the rows' prompts, exact match, the task metric (eval.task) and generation tokens/s."""
    pairs = [prompt_and_reference(r) for r in rows]
    lengths: list = []
    bar = progress(len(pairs), desc)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, [p for p, _ in pairs], cfg.max_new_tokens, cfg.batch_size,
                               lengths=lengths, progress=bar, reasoning=reasoning)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    return score(answers, [ref for _, ref in pairs], cfg.task) | {"tokens_per_second": sum(lengths) / seconds,
                                                                     "generated_tokens": sum(lengths)}


def score(answers: list[str], refs: list[str], task: str) -> dict:
    """Exact match of the answers to the references and the task metric (eval.task), each a share of the rows."""
    return {"answers": answers, "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, refs)) / len(refs),
            "task_accuracy": sum(TASKS[task](a, r) for a, r in zip(answers, refs)) / len(refs) if task != "none" else None}


# ---- task metrics -------------------------------------------------------------------------------

ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                   "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}


def words_to_number(text: str) -> Optional[int]:
    """The number an English phrase spells ("Three hundred and forty-seven." -> 347); None if it is not one."""
    words = [w for w in re.split(r"[\s\-]+", re.sub(r"[^a-z\s\-]", " ", text.lower())) if w and w != "and"]
    if not words:
        return None
    total, current = 0, 0
    for w in words:
        if w in ONES:
            current += ONES[w]
        elif w in TENS:
            current += TENS[w]
        elif w == "hundred" and current:
            current *= 100
        elif w == "thousand":
            total, current = total + max(current, 1) * 1000, 0
        else:
            return None
    return total + current


def number_words(answer: str, reference: str) -> bool:
    """The demo task: the answer names the reference's number, however it is spelled (in words or digits) or
    punctuated."""
    def number(text: str) -> Optional[int]:
        digits = text.strip().rstrip(".")
        return int(digits) if digits.isdigit() else words_to_number(text)

    want = number(reference)
    return want is not None and number(answer) == want


TASKS = {"number_words": number_words}
