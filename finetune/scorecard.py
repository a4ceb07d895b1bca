"""`eval`: a run's adapter (or a bare base model) on the recipe's eval split, at one or several precisions.

For each precision the base is loaded in (`eval.quant=[nf4,int8,none]`, each quantized one also with
`quant.skip_modules` kept unquantized when given), the same adapter goes on top, and it is measured:
loss and perplexity over the eval rows' trained tokens; greedy answers through the run's chat template,
scored by exact match and, where the recipe names one, a task metric; how often those answers agree
with the unquantized ones (16-bit on a GPU, fp32 on a CPU); the weights' memory; and generation tokens/s. The base without the adapter is
measured at the precision it was trained at. eval.json, eval.png and a table; a run's summary.json and
model cards get the figures.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from finetune.config import FinetuneConfig, QuantConfig
from finetune.errors import UserError

log = logging.getLogger("finetune")


@dataclass
class Variant:
    """One way of loading the base: its precision, the modules kept in 16-bit, the adapter on or off."""
    quant: str
    skip_modules: list = field(default_factory=list)
    adapter: bool = True

    dtype: str = "bf16"       # what quant=none loads in (the compute dtype: fp32 on a CPU)

    @property
    def label(self) -> str:
        name = f"none ({self.dtype})" if self.quant == "none" else self.quant
        if self.skip_modules:
            name += f" ({', '.join(self.skip_modules)} unquantized)"
        return name if self.adapter else f"base, {name}"


def variants(cfg: FinetuneConfig, trained: Optional[Variant]) -> list[Variant]:
    """What `eval` measures: for a run (`trained`: how its base was loaded in training), the base without the
    adapter and the adapter as trained; then each precision of eval.quant, with the unquantized reference added
    to a comparison, and each quantized one also with quant.skip_modules kept unquantized."""
    precisions = list(dict.fromkeys(cfg.eval.quant or [trained.quant if trained else cfg.quant.method]))
    if len(precisions) > 1 and "none" not in precisions:
        log.info("eval.quant: adding the unquantized base (none), the reference the answers are compared with")
        precisions.append("none")
    dtype = unquantized_dtype(cfg)
    out = [] if trained is None else [Variant(trained.quant, trained.skip_modules, adapter=False, dtype=dtype),
                                      Variant(trained.quant, trained.skip_modules, dtype=dtype)]
    for q in precisions:
        for skip in ([[]] if q == "none" else [[], *([list(cfg.quant.skip_modules)] if cfg.quant.skip_modules else [])]):
            if Variant(q, skip, dtype=dtype) not in out:
                out.append(Variant(q, skip, dtype=dtype))
    return out


def unquantized_dtype(cfg: FinetuneConfig) -> str:
    """What quant=none loads the base in here: the compute dtype train.precision resolves to on this machine."""
    from finetune.model import detect_device

    return detect_device(cfg.train, QuantConfig(method="none", double_quant=False), cfg.model).precision


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
    """The demo task: the answer names the reference's number, however it is spelled or punctuated."""
    want = words_to_number(reference)
    return want is not None and words_to_number(answer) == want


TASKS = {"number_words": number_words}


# ---- measurements -------------------------------------------------------------------------------

def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)


@torch.no_grad()
def loss_of(model, tokenizer, rows, train_on_inputs: bool, batch_size: int, max_length: int, desc: str) -> dict:
    """Mean next-token loss over the trained tokens of every row (token-weighted), and its perplexity."""
    from finetune.data.tokenize import tokenize_row

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [tokenize_row(r, tokenizer, train_on_inputs) for r in rows]
    items = [{k: v[:max_length] for k, v in t.items() if k in ("input_ids", "labels")} for t in items]
    total, count = 0.0, 0
    bar = progress(len(items), desc)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        width = max(len(t["input_ids"]) for t in batch)
        ids = torch.tensor([t["input_ids"] + [pad] * (width - len(t["input_ids"])) for t in batch], device=device)
        mask = torch.tensor([[1] * len(t["input_ids"]) + [0] * (width - len(t["input_ids"])) for t in batch], device=device)
        labels = torch.tensor([t["labels"] + [-100] * (width - len(t["labels"])) for t in batch], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
        bar.update(len(batch))
    bar.close()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}


def answers_of(model, tokenizer, rows, cfg: FinetuneConfig, desc: str) -> dict:
    """Greedy answers to the rows' prompts (chat template), exact match and the task metric, and tokens/s."""
    from finetune.evaluate import _prompt_and_reference, generate_answers

    pairs = [_prompt_and_reference(r["messages"]) for r in rows]
    lengths: list = []
    bar = progress(len(pairs), desc)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, [p for p, _ in pairs], cfg.eval.max_new_tokens, cfg.eval.batch_size,
                               lengths=lengths, progress=bar)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    refs = [ref for _, ref in pairs]
    out = {"answers": answers, "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, refs)) / len(refs),
           "task_accuracy": None, "tokens_per_second": sum(lengths) / seconds, "generated_tokens": sum(lengths)}
    if cfg.eval.task != "none":
        check = TASKS[cfg.eval.task]
        out["task_accuracy"] = sum(check(a, r) for a, r in zip(answers, refs)) / len(refs)
    return out


def load_variant(cfg: FinetuneConfig, variant: Variant, adapter_dir: Optional[Path]):
    """The base as `variant` says, with the adapter of adapter_dir on top (switched off for a base row)."""
    import warnings

    from peft import PeftModel

    from finetune.model import detect_device, load_base_model

    nf4 = variant.quant == "nf4"
    quant = QuantConfig(method=variant.quant, double_quant=nf4 and (cfg.quant.double_quant or cfg.quant.method != "nf4"),
                        compute_dtype=cfg.quant.compute_dtype if variant.quant == "nf4" else "auto",
                        skip_modules=variant.skip_modules)
    device = detect_device(cfg.train, quant, cfg.model)
    model = load_base_model(cfg.model, quant, device)
    if adapter_dir is not None:
        with warnings.catch_warnings():  # PEFT still asks transformers 5.2x for the renamed attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def _once(record, seen=set()) -> bool:
    """A log filter letting each message through once (bitsandbytes' 8-bit matmul says at every call that an
    fp32 model's inputs are cast to fp16)."""
    text = record.getMessage()
    if text in seen:
        return False
    seen.add(text)
    return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once)


def measure(cfg: FinetuneConfig, variant: Variant, adapter_dir: Optional[Path], tokenizer, rows, conversational: bool,
            with_harness: bool = False) -> dict:
    model = load_variant(cfg, variant, adapter_dir if variant.adapter else None)
    try:
        row = {"label": variant.label, "quant": variant.quant, "skip_modules": variant.skip_modules,
               "adapter": variant.adapter and adapter_dir is not None,
               "weights_gb": model.get_memory_footprint() / 1e9}
        row.update(loss_of(model, tokenizer, rows, cfg.data.train_on_inputs, cfg.eval.batch_size, cfg.data.max_length,
                           f"{variant.label}: loss"))
        if conversational:
            row.update(answers_of(model, tokenizer, rows, cfg, f"{variant.label}: answers"))
        if with_harness:
            row["harness"] = harness(model, tokenizer, cfg)
        return row
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@functools.lru_cache(maxsize=4)
def task_manager(include: Optional[str], tasks: tuple):
    """lm-eval's task index: only the include folder's tasks when they are all there (indexing lm-eval's own
    ~15,000 tasks takes seconds), else everything; built once per process."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include)


def harness(model, tokenizer, cfg: FinetuneConfig) -> dict:
    """EleutherAI's lm-evaluation-harness on the model as loaded: {task: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("eval.harness_tasks needs lm-evaluation-harness: pip install 'finetune[harness]' "
                        "(or pip install lm-eval).") from None
    include = cfg.eval.harness_include
    if include and not Path(include).expanduser().is_dir():
        raise UserError(f"eval.harness_include={include}: no such folder (it should hold lm-eval task YAML files).")
    manager = task_manager(str(Path(include).expanduser()) if include else None, tuple(cfg.eval.harness_tasks))
    unknown = [t for t in cfg.eval.harness_tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.harness_tasks: unknown task(s) {', '.join(unknown)}"
                        + (f" (not in lm-eval, nor in {include})" if include else
                           " (lm-eval's own task names, or set eval.harness_include to a folder of task YAMLs)") + ".")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.eval.harness_tasks), task_manager=manager,
                                      limit=cfg.eval.harness_limit, log_samples=False)
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.split(",")[0].endswith("_stderr") and k != "alias"}
        out[task]["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
    return out


# ---- the verb -----------------------------------------------------------------------------------

def evaluate_model(cfg: FinetuneConfig, adapter_dir: Optional[Path], tokenizer, out_dir: Path,
                   trained: Optional[Variant] = None) -> dict:
    """Every variant on the eval split; agreement with the unquantized answers; eval.json and eval.png in out_dir.
    `trained`: how a run's base was loaded in training (None for a bare base)."""
    from finetune.data import load_splits

    splits = load_splits(cfg.data, cfg.train.seed)
    if splits.eval is None:
        raise UserError("`eval` runs on the recipe's eval split and it has none: set data.eval_path, data.eval_split "
                        "or data.eval_fraction > 0.")
    rows = list(splits.eval)
    if not splits.conversational:
        log.info("the eval data is in the %s format: loss and perplexity only (exact match scores assistant replies)",
                 splits.format)
    rows_out = []
    for i, v in enumerate(variants(cfg, trained)):
        log.info("eval: %s on %d rows", v.label, len(rows))
        # the harness (slow) on the base and the adapter as trained, or on the first precision of a bare base
        with_harness = bool(cfg.eval.harness_tasks) and (i < 2 if trained else i == 0)
        rows_out.append(measure(cfg, v, adapter_dir, tokenizer, rows, splits.conversational, with_harness))
    reference = next((r for r in rows_out if r["quant"] == "none" and r["adapter"] == (adapter_dir is not None)
                      and not r["skip_modules"]), None)
    for r in rows_out:
        r["agreement"] = (sum(a == b for a, b in zip(r["answers"], reference["answers"])) / len(rows)
                                if reference is not None and "answers" in r else None)
    result = {"model": cfg.model.name_or_path, "adapter": str(adapter_dir) if adapter_dir else None,
              "trained": trained.label if trained else None, "eval_rows": len(rows),
              "eval_source": splits.eval_source, "task": cfg.eval.task, "rows": rows_out}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / "eval.png")
    return result


COLUMNS = [("loss", "loss", "{:.4f}"), ("perplexity", "ppl", "{:.3g}"), ("exact_match", "exact", "{:.3f}"),
           ("task_accuracy", "task", "{:.3f}"), ("agreement", "agree w/ none", "{:.3f}"),
           ("weights_gb", "weights GB", "{:.4f}"), ("tokens_per_second", "tok/s", "{:,.0f}")]


def table(result: dict) -> str:
    """The side-by-side table: one row per variant."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in result["rows"])]
    width = max(len(r["label"]) for r in result["rows"]) + 2
    head = f"{'':<{width}}" + "".join(f"{name:>14}" for _, name, _ in cols)
    lines = [head]
    for r in result["rows"]:
        lines.append(f"{r['label']:<{width}}" + "".join(
            f"{(fmt.format(r[k]) if r.get(k) is not None else '-'):>14}" for k, _, fmt in cols))
    for r in result["rows"]:
        for task, metrics in (r.get("harness") or {}).items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("samples", "sample_len"))
            lines.append(f"lm-eval {task} ({metrics.get('samples')} examples), {r['label']}: {shown}")
    return "\n".join(lines)


def plot(result: dict, png: Path) -> None:
    """eval.png: one bar chart per measure, a bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in COLUMNS if c[0] != "perplexity" and any(r.get(c[0]) is not None for r in result["rows"])]
    labels = [r["label"] for r in result["rows"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6 + 0.12 * max(map(len, labels))))
    for ax, (key, name, _) in zip(axes if len(cols) > 1 else [axes], cols):
        values = [r.get(key) or 0 for r in result["rows"]]
        ax.bar(range(len(values)), values, color=["#999999" if not r["adapter"] else "#3b75af" for r in result["rows"]])
        ax.set_title(name)
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(result['model']).name}: {result['eval_rows']} eval rows")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def summary_figures(result: dict) -> dict:
    """What summary.json and the model card keep: base vs tuned, and the precision trained at vs unquantized."""
    def compact(r):
        return {k: r.get(k) for k in ("label", "loss", "perplexity", "exact_match", "task_accuracy", "agreement",
                                      "weights_gb", "tokens_per_second", "harness")} if r else None

    rows = result["rows"]
    base = next((r for r in rows if not r["adapter"]), None)
    tuned = next((r for r in rows if r["adapter"] and r["label"] == result["trained"]), None)
    reference = next((r for r in rows if r["adapter"] and r["quant"] == "none" and not r["skip_modules"]), None)
    return {"eval_rows": result["eval_rows"], "task": result["task"], "base": compact(base), "tuned": compact(tuned),
            "tuned_unquantized": compact(reference), "variants": [compact(r) for r in rows]}


def eval_run(run_dir: str, checkpoint: Optional[str], overrides: list[str]) -> tuple[Path, dict]:
    """`eval run=RUN`: the run's adapter (or a checkpoint's) on its eval split; figures into summary.json and
    the model cards."""
    from transformers import AutoTokenizer

    from finetune.publish import write_model_card
    from finetune.runs import load_run

    run = load_run(run_dir, overrides)
    cfg = run.cfg
    as_trained = load_run(run_dir).cfg.quant  # quant.skip_modules may be overridden for the comparison
    trained = Variant(as_trained.method, list(as_trained.skip_modules) if as_trained.method != "none" else [],
                      dtype=unquantized_dtype(cfg))
    if not cfg.lora.enabled:
        raise UserError("`eval run=` measures a run's adapter; this run trained every weight (lora.enabled=false): "
                        f"evaluate its model/ with python -m finetune eval recipe=... model.name_or_path={run.dir / 'model'}")
    source = run.checkpoint_dir(checkpoint) if checkpoint else run.adapter_dir
    if not (source / "adapter_config.json").is_file():
        raise UserError(f"{source} holds no adapter (adapter_config.json).")
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer_dir(source)))
    out_dir = run.dir / "exports" / source.name if checkpoint else run.dir
    result = evaluate_model(cfg, source, tokenizer, out_dir, trained)
    if not checkpoint:  # the run's own figures: summary.json and the model cards
        summary = dict(run.summary)
        summary["eval"] = summary_figures(result)
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for folder, merged in ((run.adapter_dir, False), (run.merged_dir, True)):
            if (folder / "README.md").is_file():
                write_model_card(folder, cfg, summary, merged=merged)
    return out_dir, result


def eval_base(cfg: FinetuneConfig) -> tuple[Path, dict]:
    """`eval recipe=NAME`: the recipe's base model, no adapter, into output_dir."""
    from finetune.model import load_tokenizer

    out_dir = Path(cfg.output_dir).expanduser()
    if (out_dir / "config.yaml").is_file():
        raise UserError(f"output_dir={out_dir} is a training run: evaluate its adapter with python -m finetune eval "
                        f"run={out_dir}")
    tokenizer = load_tokenizer(cfg.model)
    from finetune.data.templates import apply_chat_template_choice

    apply_chat_template_choice(tokenizer, cfg.data.chat_template)
    return out_dir, evaluate_model(cfg, None, tokenizer, out_dir)
