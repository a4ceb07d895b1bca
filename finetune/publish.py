"""The model card of a run, and publishing its adapter or merged model to the Hugging Face Hub.

The card is huggingface_hub's ModelCard: metadata the Hub indexes (base_model, library_name, tags,
datasets, license, pipeline_tag) and a body with the recipe, the key hyperparameters, eval loss before
and after, the merge fidelity and the W&B run. Upload is one commit through huggingface_hub, so a
failure leaves no half-uploaded files; a repository this call created is deleted again if the commit
fails. The token comes from HF_TOKEN or `hf auth login` and is only ever handed to huggingface_hub.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig, HubConfig, ModelConfig
from finetune.errors import UserError
from finetune.model import base_model_id, is_local_path

log = logging.getLogger("finetune")

FIGURES = [  # summary.json key -> what the card calls it
    ("eval_loss_base", "eval loss, base"), ("eval_loss", "eval loss, tuned"),
    ("exact_match_base", "exact match, base"), ("exact_match", "exact match, tuned"),
    ("train_loss", "train loss"), ("train_tokens", "train tokens"), ("train_runtime_s", "train time (s)"),
    ("device", "device"), ("peak_memory_gb", "peak memory (GB)"), ("trainable_params", "trainable parameters"),
]


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


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(cfg: FinetuneConfig, summary: dict, merged: bool, repo_id: Optional[str] = None,
               online: bool = False):
    """The ModelCard of a run's adapter (merged=False) or merged model."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_id(cfg.model)
    sources = [cfg.data.path] if cfg.data.path else [s.path for s in cfg.data.sources]
    datasets = [s for s in sources if s and not is_local_path(s)]
    method = {"nf4": "qlora", "int8": "lora-int8"}.get(cfg.quant.method, "lora")
    data = ModelCardData(
        base_model=base,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        license=cfg.hub.license or base_license(cfg.model, online),
        datasets=datasets or None,
        tags=["finetune", method, "sft", "trl"] + (["base_model:adapter:" + base] if base and not merged else []),
        model_name=repo_id.split("/")[-1] if repo_id else None,
    )
    name = repo_id or "PATH_TO_THIS_FOLDER"
    # a local base or dataset is named by its folder or file name only: the card must not expose local paths
    base_desc = f"`{base}`" if base else f"a local model (`{Path(cfg.model.name_or_path).name}`)"
    if merged:
        load = f'model = AutoModelForCausalLM.from_pretrained("{name}")\ntokenizer = AutoTokenizer.from_pretrained("{name}")'
    else:
        load = (f'from peft import PeftModel\n\nbase = AutoModelForCausalLM.from_pretrained("{base or "PATH_TO_THE_BASE_MODEL"}")\n'
                f'model = PeftModel.from_pretrained(base, "{name}")\ntokenizer = AutoTokenizer.from_pretrained("{name}")')
    figures = "\n".join(f"| {label} | {_fmt(summary[k])} |" for k, label in FIGURES if summary.get(k) is not None)
    fidelity = ""
    if summary.get("merge_fidelity"):
        f = summary["merge_fidelity"]
        rows = "\n".join(f"| {b}{' (kept)' if b == f['merge_base'] else ''} | {f[b]['mean_kl']:.3g} | {f[b]['eval_loss']:.4g} |"
                         for b in ("original", "dequantized") if b in f)
        fidelity = (f"\n## Merge fidelity\n\nThe adapter merged into each base, compared with the {cfg.quant.method} "
                    f"model as trained on {f['samples']} eval rows (its loss there: {f['reference_eval_loss']:.4g}):\n\n"
                    f"| merged into | mean KL (nats/token) | loss |\n| --- | --- | --- |\n{rows}\n")
    evaluation = eval_section(summary.get("eval"))
    wandb = summary.get("wandb_url") or (f"W&B run `{summary['wandb_run']}` (logged offline)" if summary.get("wandb_run") else None)
    lora = cfg.lora
    hyper = (f"| base | {base_desc} in {cfg.quant.method} |\n"
             f"| LoRA | r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets={','.join(lora.target_modules)}"
             f"{', rsLoRA' if lora.use_rslora else ''}{', DoRA' if lora.use_dora else ''} |\n"
             f"| optimizer | {cfg.train.optim}, lr {cfg.train.learning_rate:g} ({cfg.train.lr_scheduler}) |\n"
             f"| batch | {cfg.train.micro_batch_size} x {cfg.train.grad_accum} sequences of up to {cfg.data.max_length} tokens"
             f"{', packed' if cfg.data.packing else ''} |\n"
             f"| schedule | {summary.get('steps', '?')} steps ({'max_steps' if cfg.train.max_steps > 0 else f'{cfg.train.epochs:g} epochs'}) |\n"
             f"| chat template | {summary.get('chat_template') or cfg.data.chat_template or 'tokenizer'} |")
    body = f"""
# {repo_id or ('Merged model' if merged else 'LoRA adapter')}

{'A merged model' if merged else 'A LoRA adapter'} fine-tuned from {base_desc} with
finetune recipe `{cfg.recipe}` on {', '.join(f'`{s}`' if s in datasets else f'a local dataset (`{Path(s).name}`)' for s in sources)}.
Prompts must be formatted with the chat template saved with this tokenizer, as in training:
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. generation_config.json holds the
end-of-turn ids, so generation stops by itself.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{load}
```

## Training

| setting | value |
| --- | --- |
{hyper}

## Results

| figure | value |
| --- | --- |
{figures}
{evaluation}{fidelity}
{f'Tracked in {wandb}.' if wandb else ''}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def eval_section(figures: Optional[dict]) -> str:
    """The card's table of `python -m finetune eval`: base vs tuned, and each precision the adapter was measured at."""
    if not figures:
        return ""
    cols = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.3g}"), ("exact_match", "exact match", "{:.3f}"),
            ("task_accuracy", "task accuracy", "{:.3f}"), ("agreement", "answers as unquantized", "{:.3f}"),
            ("weights_gb", "weights (GB)", "{:.3f}"), ("tokens_per_second", "tokens/s", "{:,.0f}")]
    cols = [c for c in cols if any(r and r.get(c[0]) is not None for r in figures["variants"])]
    rows = [(f"{r['label']}{' (as trained)' if figures['tuned'] and r['label'] == figures['tuned']['label'] else ''}", r)
            for r in figures["variants"]]
    body = "\n".join(f"| {label} | " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols)
                     + " |" for label, r in rows)
    harness = "".join(f"| {r['label']} | {task} | {k} | {v:.4g} |\n" for r in figures["variants"]
                      for task, metrics in (r.get("harness") or {}).items() for k, v in metrics.items()
                      if k not in ("samples", "sample_len"))
    if harness:
        harness = f"\nlm-evaluation-harness:\n\n| model | task | metric | value |\n| --- | --- | --- | --- |\n{harness}"
    return (f"\n## Evaluation\n\n`python -m finetune eval` on {figures['eval_rows']} eval rows: the base without the "
            f"adapter, the adapter as trained, and the adapter on the base loaded at other precisions"
            f"{' (task: ' + figures['task'] + ')' if figures.get('task') not in (None, 'none') else ''}.\n\n"
            f"| model | {' | '.join(name for _, name, _ in cols)} |\n| --- |{' --- |' * len(cols)}\n{body}\n{harness}")


def write_model_card(path: Path, cfg: FinetuneConfig, summary: dict, merged: bool) -> None:
    model_card(cfg, summary, merged).save(path / "README.md")


def hub_token() -> str:
    """The token of HF_TOKEN or of `hf auth login`, or one clear error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("Publishing needs a Hugging Face token with write access: set HF_TOKEN, or run "
                        "`hf auth login` (tokens: https://huggingface.co/settings/tokens).")
    return token


def _api(token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def hub_error(e: Exception, repo_id: str) -> UserError:
    """A huggingface_hub or network error -> one message saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE=1 is set, so nothing can be published: unset it.")
    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    if status == 401:
        return UserError("The Hugging Face Hub rejected the token (HF_TOKEN or `hf auth login`): it is invalid or "
                         "expired. Create one with write access at https://huggingface.co/settings/tokens.")
    if status == 403:
        return UserError(f"The token may not write to {repo_id}: use a token with write access to that user or "
                         "organization (https://huggingface.co/settings/tokens), or another hub.repo_id.")
    if status is not None:
        first = str(e).strip().splitlines()[0]
        return UserError(f"The Hugging Face Hub refused the upload to {repo_id} (HTTP {status}: {first}).")
    return UserError(f"Could not reach the Hugging Face Hub ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}). "
                     "Check the network (and HF_ENDPOINT if set), then publish the run again.")


def check_access(hub: HubConfig) -> str:
    """Before a long training run with hub.push=true: a token the Hub accepts. Returns the user name."""
    token = hub_token()
    try:
        return _api(token).whoami()["name"]
    except Exception as e:
        raise hub_error(e, hub.repo_id) from None


def publish(run_dir: Path, cfg: FinetuneConfig, summary: dict) -> str:
    """Upload the run's adapter/ (or merged/) and its model card to hub.repo_id in one commit; the commit URL."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    hub = cfg.hub
    if not hub.repo_id:
        raise UserError("Publishing needs hub.repo_id=USER/NAME: the repository to create or update.")
    folder = run_dir / hub.model
    if not (folder.is_dir() and any(folder.iterdir())):
        hint = (" Write it with: python -m finetune export run=" + str(run_dir) + " export.merge=true"
                if hub.model == "merged" else "")
        raise UserError(f"hub.model={hub.model} but {folder} holds nothing to publish.{hint}")
    token = hub_token()
    api = _api(token)
    card = model_card(cfg, summary, merged=hub.model == "merged", repo_id=hub.repo_id, online=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("README.md", "adapter_config.json"))
    operations = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]
    if hub.model == "adapter":  # the base as other machines find it (model.hub_id may be given only now)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model_id(cfg.model)
        if config["base_model_name_or_path"] is None:
            log.warning("The published adapter names no base model (the base is the local folder %s): pass "
                        "model.hub_id=ORG/NAME so that PEFT and the Hub can find it.", cfg.model.name_or_path)
        operations.append(CommitOperationAdd(path_in_repo="adapter_config.json",
                                             path_or_fileobj=(json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    message = hub.commit_message or f"finetune: {cfg.recipe} {'merged model' if hub.model == 'merged' else 'adapter'}"
    created = False
    try:
        created = not api.repo_exists(hub.repo_id)
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        if hub.revision:
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
        info = api.create_commit(hub.repo_id, operations, commit_message=message, revision=hub.revision)
    except Exception as e:
        if created:  # nothing half-done: the repository this call created goes again
            try:
                api.delete_repo(hub.repo_id, missing_ok=True)
            except Exception:
                log.warning("The empty repository %s could not be deleted after the failed upload.", hub.repo_id)
        if isinstance(e, (HfHubHTTPError, OSError, RuntimeError)) or type(e).__module__.startswith(("httpx", "huggingface_hub")):
            raise hub_error(e, hub.repo_id) from None
        raise
    log.info("published %s/ to %s (%s, %d files): %s", hub.model, hub.repo_id, "private" if hub.private else "public",
             len(operations), info.commit_url)
    return info.commit_url
