"""`eval`: a run's adapter (or a bare base model) on the recipe's eval split, at one or several precisions.

For each precision the base is loaded in (`eval.quant=[nf4,int8,none]`, each quantized one also with
`quant.skip_modules` kept unquantized when given), the same adapter goes on top, and it is measured:
loss and perplexity over the eval rows' trained tokens; greedy answers through the run's chat template,
scored by exact match and, where the recipe names one, a task metric; how often those answers agree
with the unquantized ones (16-bit on a GPU, fp32 on a CPU); the weights' memory; and generation tokens/s.
The base without the adapter is measured at the precision it was trained at. eval.json, eval.png and a
table; a run's summary.json and model cards get the figures. The measures themselves are finetune.scoring's.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig, QuantConfig
from finetune.errors import UserError
from finetune.model import check_skeleton, release_memory
from finetune.run import Run, write_whole
from finetune.data import chosen_rows
from finetune.data.pairs import tokenize_pairs
from finetune.scoring import eval_loss, measures_of, pair_logps, preference_figures, scored_answers

log = logging.getLogger("finetune")


@dataclass
class Variant:
    """One way of loading the base: its precision, the modules kept unquantized, the adapter on or off."""
    quant: str
    skip_modules: list = field(default_factory=list)
    adapter: bool = True
    dtype: str = "bf16"       # what quant=none loads in (the compute dtype: fp32 on a CPU)
    start: bool = False       # the adapter the run started from (init_from), not the one it trained

    @property
    def label(self) -> str:
        name = f"none ({self.dtype})" if self.quant == "none" else self.quant
        if self.skip_modules:
            name += f" ({', '.join(self.skip_modules)} unquantized)"
        return f"init_from, {name}" if self.start else name if self.adapter else f"base, {name}"


def variants(cfg: FinetuneConfig, trained: Optional[Variant]) -> list[Variant]:
    """What `eval` measures: for a run (`trained`: how its base was loaded in training), the base without the
    adapter and the adapter as trained; then each precision of eval.quant, with the unquantized reference added
    to a comparison, and each quantized one also with quant.skip_modules kept unquantized."""
    precisions = list(dict.fromkeys(cfg.eval.quant or [trained.quant if trained else cfg.quant.method]))
    if len(precisions) > 1 and "none" not in precisions:
        log.info("eval.quant: adding the unquantized base (none), the reference the answers are compared with")
        precisions.append("none")
    dtype = trained.dtype if trained else unquantized_dtype(cfg)
    out = [] if trained is None else [Variant(trained.quant, trained.skip_modules, adapter=False, dtype=dtype),
                                      *([Variant(trained.quant, trained.skip_modules, dtype=dtype, start=True)]
                                        if cfg.init_from else []),
                                      Variant(trained.quant, trained.skip_modules, dtype=dtype)]
    for q in precisions:
        for skip in ([[]] if q == "none" or q.startswith("gguf:") else [[], *([list(cfg.quant.skip_modules)] if cfg.quant.skip_modules else [])]):
            if Variant(q, skip, dtype=dtype) not in out:
                out.append(Variant(q, skip, dtype=dtype))
    return out


def unquantized_dtype(cfg: FinetuneConfig) -> str:
    """What quant=none loads the base in here: the compute dtype train.precision resolves to on this machine."""
    from finetune.model import detect_device

    return detect_device(cfg.train, QuantConfig(method="none"), cfg.model).precision


def _once(record, seen=set()) -> bool:
    """A log filter letting each message through once (bitsandbytes' 8-bit matmul says at every call that an
    fp32 model's inputs are cast to fp16)."""
    text = record.getMessage()
    if text in seen:
        return False
    seen.add(text)
    return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once)


def measure(run: Run, variant: Variant, rows, conversational: bool, checkpoint: Optional[str],
            with_harness: bool = False, pairs=None) -> dict:
    """Every measure of one variant on the eval rows (of preference `pairs`: their chosen sides, and how much the
    model prefers each chosen answer)."""
    loaded = run.load_for_inference(quant=variant.quant, skip_modules=variant.skip_modules, checkpoint=checkpoint,
                                    adapter=variant.adapter, adapter_dir=Run.open(run.cfg.init_from).adapter_dir
                                    if variant.start else None)
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, run.cfg
    try:
        row = {"label": variant.label, "quant": variant.quant, "skip_modules": variant.skip_modules,
               "adapter": variant.adapter and not run.is_base, "weights_gb": model.get_memory_footprint() / 1e9}
        row.update(eval_loss(model, tokenizer, rows, cfg.data, cfg.eval.batch_size, f"{variant.label}: loss"))
        if pairs is not None:
            tokens = tokenize_pairs(pairs, tokenizer, cfg.data, "eval").dataset
            row.update(preference_figures(*pair_logps(model, tokens, tokenizer.pad_token_id, cfg.eval.batch_size,
                                                      cfg.data.max_length)))
        if conversational:
            row.update(scored_answers(model, tokenizer, rows, cfg.eval, f"{variant.label}: answers",
                                      bool(run.summary.get("reasoning"))))
        if with_harness:
            row["harness"] = harness(model, tokenizer, cfg)
        return row
    finally:
        del model, loaded
        release_memory()


def check_gguf(run: Run, checkpoint: Optional[str]) -> None:
    """eval.quant=[gguf:LEVEL]: llama.cpp's tools, and a run's merged model to convert (or its GGUF files)."""
    from finetune.gguf import require

    require("eval.quant=[gguf:...]")
    if run.is_base or checkpoint:
        raise UserError("eval.quant=[gguf:LEVEL] runs a run's merged model in llama.cpp: evaluate a run (eval run=RUN, "
                        "without checkpoint=), exported with export.merge=true.")


def measure_gguf(run: Run, variant: Variant, rows, conversational: bool) -> dict:
    """A GGUF row: the run's merged model as a llama.cpp file of that level (gguf/, made from merged/ if export did
    not write it), its loss, answers and speed in llama.cpp."""
    from finetune import gguf
    from finetune.scoring import loss_items

    level = variant.quant.split(":", 1)[1]
    path = gguf.file_for(run, level)
    tokenizer, cfg = run.tokenizer(run.merged_dir), run.cfg
    row = {"label": variant.label, "quant": variant.quant, "skip_modules": [], "adapter": True,
           "weights_gb": gguf.size_gb(path)}
    items = loss_items(tokenizer, rows, cfg.data)
    # every position's logits are kept: a context as long as the longest row, not data.max_length
    llm = gguf.load(path, max((len(t["input_ids"]) for t in items), default=0) + cfg.eval.max_new_tokens + 64)
    try:
        row.update(gguf.eval_loss(llm, items, cfg.data.max_length, f"{variant.label}: loss"))
        if conversational:
            row.update(gguf.scored_answers(llm, tokenizer, rows, cfg.eval, bool(run.summary.get("reasoning"))))
    finally:
        llm.close()
    return row


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


def harness_index(cfg: FinetuneConfig):
    include = cfg.eval.harness_include
    return task_manager(str(Path(include).expanduser()) if include else None, tuple(cfg.eval.harness_tasks))


def check_harness(cfg: FinetuneConfig):
    """eval.harness_tasks: lm-eval installed, every task known, and its data reachable (lm-eval downloads it),
    before anything is evaluated. Returns lm-eval's task index."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval.harness_tasks needs lm-evaluation-harness: pip install 'finetune[harness]' "
                        "(or pip install lm-eval).") from None
    from lm_eval.tasks import get_task_dict

    include = cfg.eval.harness_include
    if include and not Path(include).expanduser().is_dir():
        raise UserError(f"eval.harness_include={include}: no such folder (it should hold lm-eval task YAML files).")
    manager = harness_index(cfg)
    unknown = [t for t in cfg.eval.harness_tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.harness_tasks: unknown task(s) {', '.join(unknown)}"
                        + (f" (not in lm-eval, nor in {include})" if include else
                           " (lm-eval's own task names, or set eval.harness_include to a folder of task YAMLs)") + ".")
    for task in cfg.eval.harness_tasks:
        try:
            get_task_dict([task], manager)  # loads the task's data set (from the datasets cache when there)
        except Exception as e:  # datasets and the Hub raise many types for a missing network or file
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(f"eval.harness_tasks: the data of {task} could not be loaded ({type(e).__name__}: {first}). "
                            "lm-eval downloads each task's data from the Hugging Face Hub: connect once (it is then "
                            "cached), or drop the task.") from None
    return manager


def harness(model, tokenizer, cfg: FinetuneConfig) -> dict:
    """EleutherAI's lm-evaluation-harness on the model as loaded: {task: {metric: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = harness_index(cfg)  # checked by check_harness before anything was evaluated
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.eval.harness_tasks), task_manager=manager,
                                      limit=cfg.eval.harness_limit, log_samples=False)
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.split(",")[0].endswith("_stderr") and k != "alias"}
        out[task]["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
    return out


def eval_splits(cfg: FinetuneConfig):
    """The recipe's splits, which must have an eval split: what `eval` measures on."""
    from finetune.data import load_splits

    splits = load_splits(cfg.data, cfg.train.seed)
    if splits.eval is None:
        raise UserError("`eval` runs on the recipe's eval split and it has none: set data.eval_path, data.eval_split "
                        "or data.eval_fraction > 0.")
    return splits


def rows_of(splits) -> tuple[list, Optional[object]]:
    """(the eval rows `measure` scores, the preference pairs or None): of pairs, each one's chosen side."""
    if splits.preference:
        return chosen_rows(splits.eval), splits.eval
    return list(splits.eval), None


# ---- the verb -----------------------------------------------------------------------------------

def evaluate(run: Run, out_dir: Path, trained: Optional[Variant] = None, checkpoint: Optional[str] = None) -> dict:
    """Every variant on the eval split; agreement with the unquantized answers; eval.json and eval.png in out_dir.
    `trained`: how a run's base was loaded in training (None for a bare base)."""
    cfg = run.cfg
    check_skeleton(cfg.model, cfg.quant, cfg.lora)
    if cfg.eval.harness_tasks:
        check_harness(cfg)
    if any(q.startswith("gguf:") for q in cfg.eval.quant):
        check_gguf(run, checkpoint)
    splits = eval_splits(cfg)
    rows, pairs = rows_of(splits)
    if not splits.chat:
        log.info("the eval data is in the %s format: loss and perplexity only (exact match scores assistant replies)",
                 splits.format)
    rows_out = []
    for i, v in enumerate(variants(cfg, trained)):
        log.info("eval: %s on %d rows", v.label, len(rows))
        # the harness (slow) on the base and the adapter as trained, or on the first precision of a bare base
        with_harness = bool(cfg.eval.harness_tasks) and (i < 2 if trained else i == 0)
        if v.quant.startswith("gguf:"):
            rows_out.append(measure_gguf(run, v, rows, splits.chat))
        else:
            rows_out.append(measure(run, v, rows, splits.chat, checkpoint, with_harness, pairs))
    reference = next((r for r in rows_out if r["quant"] == "none" and r["adapter"] == (not run.is_base)
                      and not r["skip_modules"]), None)
    for r in rows_out:
        r["agreement"] = (sum(a == b for a, b in zip(r["answers"], reference["answers"])) / len(rows)
                          if reference is not None and "answers" in r else None)
    result = {"model": cfg.model.name_or_path, "adapter": None if run.is_base else str(run.adapter_source(checkpoint)),
              "trained": trained.label if trained else None, "reference": reference["label"] if reference else None,
              "eval_rows": len(rows), "eval_source": splits.eval_source, "task": cfg.eval.task, "rows": rows_out}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_whole(out_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, out_dir / "eval.png")
    return result


def table(result: dict) -> str:
    """The side-by-side table: one row per variant."""
    cols = measures_of(result["rows"])
    width = max(len(r["label"]) for r in result["rows"]) + 2
    head = f"{'':<{width}}" + "".join(f"{name:>14}" for _, name, _, _ in cols)
    lines = [head]
    for r in result["rows"]:
        lines.append(f"{r['label']:<{width}}" + "".join(
            f"{(fmt.format(r[k]) if r.get(k) is not None else '-'):>14}" for k, _, _, fmt in cols))
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

    cols = [c for c in measures_of(result["rows"]) if c[0] != "perplexity"]
    labels = [r["label"] for r in result["rows"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6 + 0.12 * max(map(len, labels))))
    for ax, (key, name, _, _) in zip(axes if len(cols) > 1 else [axes], cols):
        values = [r.get(key) or 0 for r in result["rows"]]
        ax.bar(range(len(values)), values, color=["#999999" if not r["adapter"] else "#3b75af" for r in result["rows"]])
        ax.set_title(name)
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(result['model']).name}: {result['eval_rows']} eval rows")
    fig.tight_layout()
    write_whole(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def summary_figures(result: dict) -> dict:
    """What summary.json and the model card keep: base vs tuned, and the precision trained at vs unquantized."""
    def compact(r):
        return {k: r.get(k) for k in ("label", "loss", "perplexity", "exact_match", "task_accuracy",
                                      "preference_accuracy", "preference_margin", "agreement", "weights_gb",
                                      "tokens_per_second", "harness")} if r else None

    rows = result["rows"]
    base = next((r for r in rows if not r["adapter"]), None)
    start = next((r for r in rows if r["label"].startswith("init_from, ")), None)
    tuned = next((r for r in rows if r["adapter"] and r["label"] == result["trained"]), None)
    reference = next((r for r in rows if r["label"] == result["reference"]), None)
    return {"eval_rows": result["eval_rows"], "task": result["task"], "base": compact(base), "start": compact(start),
            "tuned": compact(tuned), "tuned_unquantized": compact(reference), "variants": [compact(r) for r in rows]}


def eval_run(run: Run, checkpoint: Optional[str]) -> tuple[Path, dict]:
    """`eval run=RUN`: the run's adapter (or a checkpoint's) on its eval split; figures into summary.json and
    the model cards."""
    if not run.cfg.lora.enabled:
        raise UserError("`eval run=` measures a run's adapter; this run trained every weight (lora.enabled=false): "
                        f"evaluate its model/ with python -m finetune eval recipe=... model.name_or_path={run.model_dir}")
    as_trained = Run.open(str(run.dir)).cfg.quant  # quant.skip_modules may be overridden for the comparison
    trained = Variant(as_trained.method, list(as_trained.skip_modules) if as_trained.method != "none" else [],
                      dtype=unquantized_dtype(run.cfg))
    out_dir = run.output_dir(run.adapter_source(checkpoint) if checkpoint else None)
    result = evaluate(run, out_dir, trained, checkpoint)
    if not checkpoint:  # the run's own figures: summary.json and the model cards
        run.write_cards(run.write_summary({"eval": summary_figures(result)}))
    return out_dir, result


def eval_base(cfg: FinetuneConfig) -> tuple[Path, dict]:
    """`eval recipe=NAME`: the recipe's base model, no adapter, into output_dir."""
    run = Run.for_base(cfg)
    return run.dir, evaluate(run, run.dir)
