"""The model card of a run's adapter/, merged/ or model/: one Markdown template, filled here.

finetune/model_card.md is the card's layout (a Jinja template, filled with huggingface_hub's
`ModelCard.from_template`, as TRL does). This module turns a run's config and summary.json into what the
template shows: the metadata the Hub indexes (base_model, library_name, tags, datasets, license,
pipeline_tag), the recipe and key hyperparameters, the figures before and after, and the sections that
later verbs add to summary.json: `eval`'s table and export's merge fidelity. Export, eval and publish all
write cards through here; no local path of this machine appears in a card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig, ModelConfig
from finetune.tokenizer import base_model_id, is_local_path

TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
FIGURES = [  # summary.json key -> what the card calls it
    ("eval_loss_base", "eval loss, base"), ("eval_loss", "eval loss, tuned"),
    ("exact_match_base", "exact match, base"), ("exact_match", "exact match, tuned"),
    ("preference_accuracy_base", "preference accuracy, base"), ("preference_accuracy", "preference accuracy, tuned"),
    ("preference_margin_base", "preference margin (nats), base"),
    ("preference_margin", "preference margin (nats), tuned"),
    ("train_loss", "train loss"), ("train_tokens", "train tokens"), ("train_runtime_s", "train time (s)"),
    ("device", "device"), ("peak_memory_gb", "peak memory (GB)"), ("trainable_params", "trainable parameters"),
]


def render(cfg: FinetuneConfig, summary: dict, merged: bool, repo_id: Optional[str] = None, online: bool = False):
    """The ModelCard of a run's adapter (merged=False) or merged model; `repo_id` where it is published."""
    from huggingface_hub import ModelCard

    base = base_model_id(cfg.model)
    return ModelCard.from_template(
        card_data(cfg, base, merged, repo_id, online, (summary.get("gguf") or {}).get("levels", [])),
        template_path=str(TEMPLATE),
        title=repo_id or ("Merged model" if merged else "LoRA adapter"),
        what="A merged model" if merged else "A LoRA adapter",
        base=describe_base(cfg.model),
        recipe=cfg.recipe, data=", ".join(data_names(cfg)), load_code=load_code(base, merged, repo_id),
        training=training(cfg, summary), results=results(summary), evaluation=evaluation(summary.get("eval")),
        fidelity=fidelity(cfg, summary.get("merge_fidelity")), gguf=gguf_files(summary.get("gguf"), repo_id),
        tracked=tracked(summary))


def write(folder: Path, cfg: FinetuneConfig, summary: dict, merged: bool) -> None:
    render(cfg, summary, merged).save(folder / "README.md")


def sources(cfg: FinetuneConfig) -> list[str]:
    return [cfg.data.path] if cfg.data.path else [s.path for s in cfg.data.sources]


def card_data(cfg: FinetuneConfig, base: Optional[str], merged: bool, repo_id: Optional[str], online: bool,
              gguf_levels: list):
    """The card's metadata, which the Hub indexes (`gguf_levels`: the GGUF files hub.gguf=true uploads)."""
    from huggingface_hub import ModelCardData

    method = {"nf4": "qlora", "int8": "lora-int8"}.get(cfg.quant.method, "lora")
    hub_datasets = [s for s in sources(cfg) if s and not is_local_path(s)]
    return ModelCardData(
        base_model=base,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        license=cfg.hub.license or base_license(cfg.model, online),
        datasets=hub_datasets or None,
        tags=["finetune", method, cfg.train.objective, "trl"]
        + (["base_model:adapter:" + base] if base and not merged else [])
        + (["gguf", "llama.cpp", *gguf_levels] if cfg.hub.gguf else []),
        model_name=repo_id.split("/")[-1] if repo_id else None,
    )


def base_license(model: ModelConfig, online: bool = False) -> Optional[str]:
    """The license in the base model's own card (its README.md front matter), where it can be read."""
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        if is_local_path(model.name_or_path):
            readme = Path(model.name_or_path).expanduser() / "README.md"
        else:
            readme = Path(hf_hub_download(model.name_or_path, "README.md", revision=model.revision,
                                          local_files_only=not online))
        return ModelCard.load(readme).data.license if readme.is_file() else None
    except Exception:  # no card, not cached, no network: the card then says nothing about the license
        return None


def data_names(cfg: FinetuneConfig) -> list[str]:
    """The datasets: a Hub id as it is, a local file by its name only (a card must not show local paths)."""
    return [f"`{s}`" if not is_local_path(s) else f"a local dataset (`{Path(s).name}`)" for s in sources(cfg)]


def load_code(base: Optional[str], merged: bool, repo_id: Optional[str]) -> str:
    name = repo_id or "PATH_TO_THIS_FOLDER"
    if merged:
        return f'model = AutoModelForCausalLM.from_pretrained("{name}")\ntokenizer = AutoTokenizer.from_pretrained("{name}")'
    return (f'from peft import PeftModel\n\nbase = AutoModelForCausalLM.from_pretrained("{base or "PATH_TO_THE_BASE_MODEL"}")\n'
            f'model = PeftModel.from_pretrained(base, "{name}")\ntokenizer = AutoTokenizer.from_pretrained("{name}")')


def training(cfg: FinetuneConfig, summary: dict) -> list[tuple[str, str]]:
    """The recipe's key settings."""
    lora, t = cfg.lora, cfg.train
    schedule = "max_steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    return [("objective", objective(cfg, summary)),
            ("base", f"{describe_base(cfg.model)} in {cfg.quant.method}"),
            ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets={','.join(lora.target_modules)}"
                     f"{', rsLoRA' if lora.use_rslora else ''}{', DoRA' if lora.use_dora else ''}"),
            ("optimizer", f"{t.optim}, lr {t.learning_rate:g} ({t.lr_scheduler})"),
            ("batch", f"{t.micro_batch_size} x {t.grad_accum} {'sequences' if t.objective == 'sft' else 'pairs'} of up "
                      f"to {cfg.data.max_length} tokens"
                      f"{', packed' if cfg.data.packing else ''}"),
            ("schedule", f"{summary.get('steps', '?')} steps ({schedule})"),
            ("chat template", summary.get("chat_template") or cfg.data.chat_template or "tokenizer")]


def objective(cfg: FinetuneConfig, summary: dict) -> str:
    """What was learned, from which data: supervised replies, or the preference pairs (DPO or ORPO, its beta or
    lambda, its start)."""
    t = cfg.train
    if t.objective == "sft":
        return f"supervised fine-tuning on the data's replies ({summary.get('data_format', '?')} rows)"
    start = f"; continued from the adapter of {Path(cfg.init_from).name}" if cfg.init_from else ""
    rpo = f", plus {t.sft_weight:g} x the chosen answers' cross-entropy" if t.sft_weight else ""
    weight = (f"beta={t.beta:g}{rpo}" if t.objective == "dpo" else
              f"the chosen answers' cross-entropy plus lambda={t.beta:g} x the odds-ratio term")
    return (f"{t.objective.upper()} on preference pairs ({summary.get('data_format', '?')}: prompt, chosen and "
            f"rejected answers), {weight}{start}")


def describe_base(model: ModelConfig) -> str:
    """The base by its Hub id, or a local one by its folder's name only."""
    base = base_model_id(model)
    return f"`{base}`" if base else f"a local model (`{Path(model.name_or_path).name}`)"


def results(summary: dict) -> list[tuple[str, str]]:
    return [(label, f"{summary[k]:.4g}" if isinstance(summary[k], float) else str(summary[k]))
            for k, label in FIGURES if summary.get(k) is not None]


def evaluation(figures: Optional[dict]) -> Optional[dict]:
    """`python -m finetune eval`'s table: base vs tuned, and each precision the adapter was measured at."""
    from finetune.scoring import measures_of

    if not figures:
        return None
    measures = measures_of(figures["variants"])
    tuned = figures["tuned"]["label"] if figures["tuned"] else None
    table = [[f"{r['label']}{' (as trained)' if r['label'] == tuned else ''}",
              *(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, _, fmt in measures)]
             for r in figures["variants"]]
    harness = [[r["label"], task, k, f"{v:.4g}"] for r in figures["variants"]
               for task, metrics in (r.get("harness") or {}).items() for k, v in metrics.items()
               if k not in ("samples", "sample_len")]
    task = f" (task: {figures['task']})" if figures.get("task") not in (None, "none") else ""
    return {"rows": figures["eval_rows"], "task": task, "header": [name for _, _, name, _ in measures],
            "table": table, "harness": harness}


def fidelity(cfg: FinetuneConfig, figures: Optional[dict]) -> Optional[dict]:
    """Export's merge check: each base the adapter was merged into, against the model as trained."""
    if not figures:
        return None
    table = [[f"{b}{' (kept)' if b == figures['merge_base'] else ''}", f"{figures[b]['mean_kl']:.3g}",
              f"{figures[b]['eval_loss']:.4g}"] for b in ("original", "dequantized") if b in figures]
    return {"quant": cfg.quant.method, "samples": figures["samples"],
            "reference_loss": f"{figures['reference_eval_loss']:.4g}", "table": table}


def gguf_files(figures: Optional[dict], repo_id: Optional[str]) -> Optional[dict]:
    """Export's GGUF files: each level run by llama.cpp against the model as trained, and how to run them."""
    if not figures:
        return None
    adapter = figures.get("adapter", {}).get("file")
    if not figures.get("files"):
        return {"table": [], "adapter": adapter} if adapter else None
    def share(v):
        return f"{100 * v:.0f}%" if v is not None else "-"
    table = [[f"`{f['file']}`", f"{f['size_gb']:.3g} GB", f"{f['mean_kl']:.3g}", share(f.get("agreement")),
              share(f.get("exact_match")), f"{f['tokens_per_second']:.0f}" if f.get("tokens_per_second") else "-",
              "yes" if f["within_max_kl"] else "**no**"] for f in figures["files"].values()]
    chosen = figures.get("modelfile")
    run = (f"ollama run hf.co/{repo_id}:{chosen.rsplit('-', 1)[1].removesuffix('.gguf').upper()}" if repo_id and chosen
           else "ollama create NAME -f Modelfile && ollama run NAME" if chosen else None)
    return {"samples": figures["samples"], "max_kl": figures["max_kl"], "table": table, "modelfile": chosen, "run": run,
            "problem": figures.get("modelfile_problem"), "adapter": adapter}


def tracked(summary: dict) -> Optional[str]:
    """The W&B run: its URL, or its path for an offline run."""
    if summary.get("wandb_url"):
        return summary["wandb_url"]
    return f"W&B run `{summary['wandb_run']}` (logged offline)" if summary.get("wandb_run") else None
