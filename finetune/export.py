"""Export: adapter/ always; merged/ on request, with a measured fidelity.

A QLoRA adapter was trained on top of the NF4-quantized base. Merging it into the original 16-bit base
gives a slightly different function than the one trained (the base's quantization error is gone, but
the adapter learned to work with it); merging into the dequantized NF4 base gives exactly the trained
function, up to rounding. Which is better depends on the model, so it is measured: each candidate's
next-token distributions on a few eval rows are compared with the 4-bit model as trained (mean KL) and
its loss on them is reported. Merging never touches 4-bit weights (rounding the merged weights back to
NF4 would lose most of the update), and it runs in CPU memory, so it needs no GPU memory at all.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from finetune.config import DataConfig, FinetuneConfig, ModelConfig, QuantConfig
from finetune.errors import UserError
from finetune.model import DTYPES, Device, attach_adapter, load_base_model, write_generation_config
from finetune.run import Run, staged
from finetune.scoring import mean_loss
from finetune.tokenizer import base_model_id, is_local_path

log = logging.getLogger("finetune")

# an adapter's files copied as saved when it is exported again: its weights and config, the tokenizer as trained,
# its card (until the new one is written, once the export is complete)
AS_SAVED = ("adapter_model.safetensors", "adapter_config.json", "tokenizer", "special_tokens_map", "chat_template",
            "added_tokens", "vocab.", "merges.txt", "README.md")
CHECK_TOKENS = 256  # trained tokens' span of each check sample: enough to compare distributions, cheap on a CPU
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


# ---- the adapter --------------------------------------------------------------------------------

def adapter_warnings(cfg: FinetuneConfig) -> list[str]:
    """What keeps the adapter from loading elsewhere (another machine, vLLM): said once, at export."""
    warnings = []
    if base_model_id(cfg.model) is None:
        warnings.append(f"The base model is a local folder ({cfg.model.name_or_path}): adapter_config.json records its "
                        "path, which loads here; what `publish` uploads names no base model (a local path would not "
                        "resolve on another machine). Set model.hub_id=ORG/NAME to record the Hub id it is a copy of.")
    lora = cfg.lora
    if lora.modules_to_save:
        warnings.append(f"lora.modules_to_save={list(lora.modules_to_save)}: vLLM cannot load adapters that save "
                        "whole modules; serve the merged model instead (export.merge=true).")
    if lora.use_dora:
        warnings.append("lora.use_dora=true: vLLM cannot serve DoRA adapters; serve the merged model instead.")
    if lora.r > VLLM_MAX_LORA_RANKS[-1]:
        warnings.append(f"lora.r={lora.r}: vLLM serves adapters up to rank {VLLM_MAX_LORA_RANKS[-1]}; serve the "
                        "merged model instead, or train with a lower rank.")
    elif lora.r not in VLLM_MAX_LORA_RANKS:
        serve = next(r for r in VLLM_MAX_LORA_RANKS if r >= lora.r)
        warnings.append(f"lora.r={lora.r} is not one of vLLM's ranks ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}): "
                        f"serve it with --max-lora-rank {serve}, which reserves memory for rank {serve}.")
    return warnings


def save_adapter(model, tokenizer, adapter_dir: Path, cfg: FinetuneConfig, state_dict: Optional[dict] = None,
                 weights_from: Optional[Path] = None) -> None:
    """adapter_config.json (naming the base as loaded: a local copy loads by itself; `publish` uploads the Hub id),
    adapter_model.safetensors, the tokenizer with the training chat template, and generation_config.json.
    `state_dict`: the model's full state dict where the model itself holds only a shard (FSDP). `weights_from`:
    an adapter folder whose weights are copied as they are (re-saving a loaded adapter would write fp32)."""
    copied = [f for f in weights_from.iterdir() if f.is_file() and f.name.startswith(AS_SAVED)] if weights_from else []
    for f in copied:
        shutil.copyfile(f, adapter_dir / f.name)
    if not copied:
        model.save_pretrained(str(adapter_dir), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
    if not any(f.name.startswith("tokenizer") for f in copied):
        tokenizer.save_pretrained(str(adapter_dir))
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = local_base(cfg.model)
    if cfg.model.revision:
        config["revision"] = cfg.model.revision
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_generation_config(adapter_dir, cfg.model, tokenizer)
    for warning in adapter_warnings(cfg):
        log.warning(warning)


def local_base(model: ModelConfig) -> str:
    """The base as this machine loads it: a local folder by its absolute path, else the Hub id."""
    return str(Path(model.name_or_path).expanduser().resolve()) if is_local_path(model.name_or_path) else model.name_or_path


# ---- the fidelity check -------------------------------------------------------------------------

def check_samples(tokenizer, rows, n: int, data: DataConfig) -> list[dict]:
    """input_ids and labels (-100 where no loss) of the first n sequences of the rows, tokenized as in training
    (the same labels), cut CHECK_TOKENS after the first trained token (a long prompt or system preamble is kept
    whole: the reply's context)."""
    from finetune.data.tokenize import tokenize_row

    out = []
    for row in rows:
        for t in tokenize_row(row, tokenizer, data.train_on_inputs, data.turns):
            first = next((i for i, label in enumerate(t["labels"]) if i > 0 and label != -100), None)
            if len(out) < n and first is not None:
                end = first + CHECK_TOKENS
                out.append({"input_ids": torch.tensor([t["input_ids"][:end]]),
                            "labels": torch.tensor([t["labels"][:end]])})
        if len(out) == n:
            break
    if not out:
        raise UserError("The merge check found no trained token in any row: export.check_samples needs rows with "
                        "replies (the data has none).")
    return out


@torch.no_grad()
def logits_of(model, samples: list[dict]) -> list[torch.Tensor]:
    """Float32 CPU logits of each sample (the model is left in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=s["input_ids"].to(device)).logits.float().cpu() for s in samples]


def fidelity(reference: list[torch.Tensor], logits: list[torch.Tensor], samples: list[dict]) -> dict:
    """How far `logits` are from the model as trained: mean KL(trained || merged) per token, the largest
    |logit| difference, and the loss on the samples."""
    kl = torch.cat([
        torch.nn.functional.kl_div(y.log_softmax(-1), x.log_softmax(-1), log_target=True, reduction="none").sum(-1).flatten()
        for x, y in zip(reference, logits)
    ]).mean().item()
    kl = max(kl, 0.0)  # KL is never negative; float rounding can make an exact match read -1e-9
    max_abs = max((x - y).abs().max().item() for x, y in zip(reference, logits))
    return {"mean_kl": kl, "max_abs_logit_diff": max_abs, "eval_loss": mean_loss(logits, samples)}


# ---- merging ------------------------------------------------------------------------------------

def build_merged(cfg: FinetuneConfig, adapter_dir: Path, merge_base: str):
    """The adapter merged into the base, in CPU memory, in export.merge_dtype: merge_base=original reloads
    the base unquantized; dequantized loads it in 4-bit as in training and dequantizes every layer first."""
    dtype = DTYPES[cfg.export.merge_dtype]
    cpu = Device("cpu", "cpu", True, "fp32", dtype)
    if merge_base == "dequantized":
        base = load_base_model(cfg.model, cfg.quant, cpu, dtype=dtype)
        base = base.dequantize(dtype=dtype)
    else:
        base = load_base_model(cfg.model, QuantConfig(method="none"), cpu, dtype=dtype)
    model = attach_adapter(base, adapter_dir).merge_and_unload()
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    return model


def candidates(cfg: FinetuneConfig) -> list[str]:
    if cfg.export.merge_base != "auto":
        return [cfg.export.merge_base]
    return ["original", "dequantized"] if cfg.quant.method == "nf4" else ["original"]


def export_merged(cfg: FinetuneConfig, adapter_dir: Path, merged_dir: Path, tokenizer, samples: list[dict],
                  reference: list[torch.Tensor], retry: str = "python -m finetune export run=RUN_DIR") -> dict:
    """Merge into each candidate base, compare each with the model as trained (`reference` logits on
    `samples`), save the closest to merged_dir. Returns the figures for summary.json."""
    figures: dict = {"reference_eval_loss": mean_loss(reference, samples), "samples": len(samples)}
    model, chosen, best = None, None, float("inf")
    for name in candidates(cfg):
        del model
        gc.collect()
        model = build_merged(cfg, adapter_dir, name)
        figures[name] = fidelity(reference, logits_of(model, samples), samples)
        log.info("merge into the %s base: mean KL to the model as trained %.3g, loss %.4g (as trained: %.4g)",
                 name, figures[name]["mean_kl"], figures[name]["eval_loss"], figures["reference_eval_loss"])
        if figures[name]["mean_kl"] < best:
            chosen, best = name, figures[name]["mean_kl"]
    figures["merge_base"] = chosen
    summary = {"merge_base": chosen, "merge_mean_kl": best, "merge_eval_loss": figures[chosen]["eval_loss"],
               "merge_reference_eval_loss": figures["reference_eval_loss"], "merge_fidelity": figures}
    if best > cfg.export.max_kl:
        del model
        raise MergeRejected(summary, (
            f"The merged model is further from the model as trained than export.max_kl={cfg.export.max_kl} allows "
            f"(mean KL {best:.3g} nats per token, merged into the {chosen} base), so merged/ was not written. The "
            f"adapter in {adapter_dir} is intact and is the model as trained. Try export.merge_dtype=float32 (or "
            f"raise export.max_kl): {retry} export.merge_dtype=float32"))
    if chosen != name:  # the closest is not the one in memory: rebuild it (cheaper than holding two models)
        del model
        gc.collect()
        model = build_merged(cfg, adapter_dir, chosen)
    model.save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    write_generation_config(merged_dir, cfg.model, tokenizer)
    (merged_dir / "fidelity.json").write_text(json.dumps(figures, indent=2) + "\n")
    del model
    gc.collect()
    return summary


class MergeRejected(UserError):
    """The merged model (or a GGUF file of it) failed the fidelity check; `summary` holds the figures measured."""

    def __init__(self, summary: dict, message: str):
        super().__init__(message)
        self.summary = summary


# ---- a run's artefacts --------------------------------------------------------------------------

def export_artifacts(run: Run, out_dir: Path, model, tokenizer, rows, summary: dict,
                     retry: str = "python -m finetune export run=RUN_DIR", state_dict: Optional[dict] = None,
                     reference: Optional[list] = None, weights_from: Optional[Path] = None) -> None:
    """adapter/ from the PEFT `model` (the base in 4-bit as trained, with its adapter; or its weights as saved in
    `weights_from`), merged/ where export.merge asks, and their model cards, in out_dir (the run, or
    exports/checkpoint-N/). Each folder is written whole or not at all (run.staged). `rows` are the (converted)
    rows the merge is checked on; `summary` is updated in place with the merge figures. A rejected merge raises
    MergeRejected after everything else is written, and an earlier merged/ stays. Under FSDP the caller gathers
    `state_dict` and the `reference` logits of the model as trained (finetune.distributed.gather_for_export)."""
    cfg = run.cfg
    summary.update({k: None for k in ("merge_base", "merge_mean_kl", "merge_eval_loss", "merge_reference_eval_loss",
                                      "merge_fidelity")})
    if not hasattr(model, "peft_config"):  # full fine-tuning: the model itself is the result, a plain transformers model
        with staged(out_dir / "model") as folder:
            save_model(model, tokenizer, folder, cfg, state_dict, summary.get("precision"))
        run.write_cards(summary, out_dir)
        return
    with staged(out_dir / "adapter") as folder:
        save_adapter(model, tokenizer, folder, cfg, state_dict, weights_from)
    rejected, merged = None, False
    summary["gguf"] = None
    if cfg.export.merge:
        samples = check_samples(tokenizer, rows, cfg.export.check_samples, cfg.data)
        if reference is None:
            reference = logits_of(model, samples)  # the model as trained: 4-bit base + adapter
        answers = None  # what each GGUF's answers are compared with: the trained model's, taken before merging while
        if cfg.export.gguf and state_dict is None:  # it is here (whole: under FSDP it is sharded, and they are skipped)
            from finetune.gguf import answer_check

            answers = answer_check(model, tokenizer, rows, cfg.export.check_samples, cfg.eval.max_new_tokens,
                                   cfg.eval.task)
        try:
            with staged(out_dir / "merged") as folder:
                summary.update(export_merged(cfg, out_dir / "adapter", folder, tokenizer, samples, reference, retry))
            merged = True
        except MergeRejected as e:
            summary.update(e.summary)
            rejected = e if not (out_dir / "merged").exists() else MergeRejected(e.summary, f"{e} The merged/ "
                                                                                 "already there, from an earlier export, is kept.")
        if merged and (cfg.export.gguf or cfg.export.gguf_adapter):
            rejected = export_gguf_folder(cfg, out_dir, tokenizer, samples, reference, answers, rows, summary, retry)
        elif merged and (out_dir / "gguf").is_dir():
            log.warning("%s is from an earlier export and no longer matches merged/: write it again with "
                        "export.gguf=[LEVEL,...], or delete it.", out_dir / "gguf")
    elif cfg.export.gguf_adapter:
        rejected = export_gguf_folder(cfg, out_dir, tokenizer, [], [], None, rows, summary, retry)
    run.write_cards(summary, out_dir)
    if rejected is not None:
        raise rejected


def export_gguf_folder(cfg: FinetuneConfig, out_dir: Path, tokenizer, samples, reference, answers, rows,
                       summary: dict, retry: str) -> Optional[MergeRejected]:
    """gguf/: the llama.cpp files of merged/ (export.gguf), each measured, the Modelfile, and the adapter's GGUF
    (export.gguf_adapter). Returns the error to end the export with where a file is further than export.max_kl:
    reported as a rejected merge is, once everything is written."""
    from finetune import gguf

    with staged(out_dir / "gguf") as folder:
        figures = {}
        if cfg.export.gguf:
            figures = gguf.export_gguf(cfg, folder, out_dir / "merged", tokenizer, samples, reference, answers, rows)
        if cfg.export.gguf_adapter:
            figures["adapter"] = gguf.write_adapter(out_dir / "adapter", base_folder(cfg.model), folder, gguf.stem(cfg))
        (folder / "fidelity.json").write_text(json.dumps(figures, indent=2) + "\n")
        summary["gguf"] = figures
    message = gguf.rejected_message(figures, retry) if cfg.export.gguf else None
    return MergeRejected(summary, message) if message else None


def base_folder(model: ModelConfig) -> Path:
    """The base model's folder on this machine (llama.cpp's LoRA converter reads its config.json): a local folder,
    or the Hub cache's copy of config.json."""
    if is_local_path(model.name_or_path):
        return Path(model.name_or_path).expanduser().resolve()
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model.name_or_path, "config.json", revision=model.revision)).parent


def save_model(model, tokenizer, folder: Path, cfg: FinetuneConfig, state_dict: Optional[dict] = None,
               precision: Optional[str] = None) -> None:
    """A full fine-tune's model/: a plain transformers model with the tokenizer and its generation config, in the
    16-bit dtype it trained in (the fp32 master weights of mixed precision rounded once, as the base shipped)."""
    import torch

    from finetune.model import DTYPES

    dtype = DTYPES.get(precision or "fp32", torch.float32)
    state_dict = state_dict if state_dict is not None else model.state_dict()
    cast = {}  # by storage, so that tied weights stay one tensor
    state_dict = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) if v.is_floating_point() else v
                  for k, v in state_dict.items()}
    model.config.dtype = dtype
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(folder))
    write_generation_config(folder, cfg.model, tokenizer)


def export(run: Run, checkpoint: Optional[str]) -> tuple[Path, dict]:
    """`export`: write a run's adapter/ and merged/ again, from its final adapter (into the run directory)
    or from one of its checkpoints (into RUN_DIR/exports/checkpoint-N/). Returns (where, summary)."""
    from finetune.data import check_rows, load_splits
    from finetune.gguf import check_export

    check_export(run.cfg.model, run.cfg.export)
    splits = load_splits(run.cfg.data, run.cfg.train.seed)
    loaded = run.load_for_inference(checkpoint=checkpoint)
    out_dir = run.output_dir(loaded.source if checkpoint else None)
    summary = dict(run.summary)
    if checkpoint:  # the figures after training are not this checkpoint's
        summary.update({k: None for k in ("eval_loss", "exact_match", "train_loss", "exact_match_examples")})
        summary["checkpoint"] = loaded.source.name
    out_dir.mkdir(parents=True, exist_ok=True)
    retry = f"python -m finetune export run={run.dir}" + (f" checkpoint={checkpoint}" if checkpoint else "")
    try:  # the weights as saved: re-saving the loaded adapter would write them in fp32
        export_artifacts(run, out_dir, loaded.model, loaded.tokenizer, check_rows(splits), summary, retry,
                         weights_from=loaded.source)
    except MergeRejected:
        run.write_summary(summary, out_dir)  # the figures of the merge that was refused
        raise
    run.write_summary(summary, out_dir)
    return out_dir, summary
