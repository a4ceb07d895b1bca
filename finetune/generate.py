"""`generate`: answer prompts with a run's adapter (or merged model), formatted as in training.

The tokenizer saved with the run carries the training chat template and its end-of-turn token as EOS,
and generation_config.json every EOS id, so answers stop by themselves. compare=true answers each
prompt with the untouched base too (the adapter switched off) and prints both side by side.
"""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from pathlib import Path

import torch

from finetune.data import formats
from finetune.errors import UserError
from finetune.run import Loaded, Run
from finetune.verb_args import GenerateArgs

log = logging.getLogger("finetune")
RAW_FORMATS = ("text", "prompt_completion", "preference")  # trained on raw text: prompts are continued as they are


def read_prompts(args: GenerateArgs) -> list[list[dict]]:
    """Each prompt as a conversation: [system,] user."""
    if bool(args.prompt) == bool(args.prompts_file):
        raise UserError('Give either prompt="..." or prompts_file=FILE (a .txt file, one prompt per line, or a '
                        '.jsonl file with a "prompt" field per row).')
    texts: list = []
    if args.prompt:
        texts = [args.prompt]
    else:
        path = Path(args.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompts_file={args.prompts_file}: no such file.")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}).") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise UserError(f'{path}, line {n}: expected an object with a "prompt" string, e.g. {{"prompt": "Hi"}}.')
                texts.append(row["prompt"])
        else:
            texts = [line for line in lines if line.strip()]
        if not texts:
            raise UserError(f"prompts_file={args.prompts_file} holds no prompts.")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [system + [{"role": "user", "content": t}] for t in texts]


def load_model(run: Run, args: GenerateArgs) -> Loaded:
    """The base in 4-bit/8-bit/16-bit with the adapter (or a checkpoint's), or merged/, as `args` ask."""
    if args.model == "merged" and args.compare:
        raise UserError("compare=true answers with the base and with the adapter switched on: use model=adapter.")
    loaded = run.load_for_inference(quant=args.quant, checkpoint=args.checkpoint, merged=args.model == "merged")
    log.info("loaded %s (%s base) on %s", loaded.source, loaded.quant, loaded.device.describe())
    return loaded


def generation_kwargs(args: GenerateArgs, tokenizer, source: Path, run: Run) -> dict:
    from transformers import GenerationConfig

    from finetune.model import eos_token_ids

    folder = next((f for f in (source, run.adapter_dir) if (f / "generation_config.json").is_file()), None)
    eos = eos_token_ids(tokenizer, GenerationConfig.from_pretrained(str(folder)) if folder else None)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, eos_token_id=eos,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


@torch.no_grad()
def answer(model, tokenizer, conversation: list[dict], raw: bool, kwargs: dict, streamer=None,
           reasoning: bool = False) -> tuple[str, int, bool]:
    """(the answer, its token count, whether it ended at an EOS token). The prompt is formatted as training
    conditioned replies (finetune.data.masks.inference_prompt)."""
    from finetune.data.masks import inference_prompt

    if raw:
        text = "\n\n".join(m["content"] for m in conversation)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        text = inference_prompt(tokenizer, conversation, reasoning=reasoning)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), streamer=streamer,
                         **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in kwargs["eos_token_id"]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), stopped


def side_by_side(left: str, right: str, titles=("base", "tuned")) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    cols = [[line for para in text.splitlines() or [""] for line in (textwrap.wrap(para, width) or [""])]
            for text in (left, right)]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(c) for c in cols)):
        a, b = (c[i] if i < len(c) else "" for c in cols)
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def generate(run: Run, args: GenerateArgs) -> list[dict]:
    """Answer every prompt, printing as it goes; returns [{"prompt", "answer", "tokens", "stopped_at_eos", "base"?}]."""
    from transformers import TextStreamer

    conversations = read_prompts(args)
    loaded = load_model(run, args)
    model, tokenizer = loaded.model, loaded.tokenizer
    raw = run.summary.get("data_format") in RAW_FORMATS
    reasoning = bool(run.summary.get("reasoning"))  # trained to think first: no empty thinking block in the prompt
    kwargs = generation_kwargs(args, tokenizer, loaded.source, run)
    results = []
    for conversation in conversations:
        if args.do_sample:
            torch.manual_seed(args.seed)
        prompt = conversation[-1]["content"]
        if run.cfg.data.system_prompt == "fold":  # the system text where training put it: in the first user turn
            conversation = formats.fold(list(conversation))
        print(f">>> {prompt}", flush=True)
        if args.compare:
            with model.disable_adapter():
                base, _, _ = answer(model, tokenizer, conversation, raw, kwargs, reasoning=reasoning)
            text, n, stopped = answer(model, tokenizer, conversation, raw, kwargs, reasoning=reasoning)
            print(side_by_side(base, text))
        else:
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
            text, n, stopped = answer(model, tokenizer, conversation, raw, kwargs, streamer, reasoning)
            if streamer is None:
                print(text)
            base = None
        print(f"[{n} tokens, {'stopped at EOS' if stopped else f'cut at max_new_tokens={args.max_new_tokens}'}]\n", flush=True)
        results.append({"prompt": prompt, "answer": text, "tokens": n, "stopped_at_eos": stopped}
                       | ({"base": base} if args.compare else {}))
    return results
