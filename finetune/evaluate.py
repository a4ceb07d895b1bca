"""Evaluation beyond the loss: greedy answers to held-out prompts, scored by exact match."""

from __future__ import annotations

import torch


def _prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the last assistant message, and that message's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                     lengths: list | None = None, progress=None) -> list[str]:
    """Greedy completions of each conversation's prompt, formatted with the tokenizer's chat template.
    `lengths` (a list) receives each answer's generated tokens, its EOS included; `progress` (a tqdm bar)
    is advanced by each batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    answers = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [
                tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                for c in conversations[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if lengths is not None:
                for row in new.tolist():
                    lengths.append(row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row))
            if progress is not None:
                progress.update(len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def answers_across_processes(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                             batch_size: int) -> list[str]:
    """generate_answers, with the conversations split between the processes of a DDP run (each holds the whole
    model) and the answers gathered in order. Every process gets as many (the last padded with repeats), so
    all make the same number of generate calls and reach the gather together."""
    from finetune import distributed

    w = distributed.world()
    if not w.distributed or not conversations:
        return generate_answers(model, tokenizer, conversations, max_new_tokens, batch_size)
    per = -(-len(conversations) // w.size)
    mine = conversations[w.rank * per:(w.rank + 1) * per]
    answers = generate_answers(model, tokenizer, mine + [conversations[0]] * (per - len(mine)), max_new_tokens, batch_size)
    everyone = distributed.gather(answers)
    return [a for r in range(w.size) for a in everyone[r * per:r * per + len(conversations[r * per:(r + 1) * per])]]


def exact_match(model, tokenizer, rows, max_new_tokens: int, batch_size: int) -> dict:
    """Share of rows whose greedy answer equals the reference exactly (surrounding whitespace ignored).

    An answer that runs on past the reference, because the model did not stop, does not match.
    """
    pairs = [_prompt_and_reference(r["messages"]) for r in rows]
    answers = answers_across_processes(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs)]
    examples = [
        {"prompt": p[-1]["content"], "reference": ref, "answer": a}
        for a, (p, ref) in list(zip(answers, pairs))[:5]
    ]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits), "examples": examples}
