"""`prune`: depth pruning by block influence.

Every decoder layer is scored on the eval rows by how much it changes the hidden state: block influence, the mean
over tokens of 1 - cos(layer input, layer output) (ShortGPT, Men et al. 2024). The least influential layers are dropped
(prune.layers, or as few as bring the model under prune.target_params) and the smaller model is written as a plain
transformers model whose config.json says its new depth, so it loads anywhere. Its loss and exact match on the eval
rows are measured before and after.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from finetune.config import FinetuneConfig, PruneConfig
from finetune.errors import UserError

log = logging.getLogger("finetune")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList as long as its config's num_hidden_layers."""
    depth = model.config.get_text_config().num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    if not found:
        raise UserError(f"prune: {type(model).__name__} has no list of {depth} decoder layers that can be cut.")
    return found[0]


@torch.no_grad()
def block_influence(model, items: list[dict]) -> tuple[list[float], int]:
    """Each decoder layer's mean 1 - cos(input, output) over the tokens of `items` (input_ids), in layer order; and
    the number of those tokens (the pass's cost: prune.json, `eval compare=`'s GPU-hours)."""
    layers, totals, count = decoder_layers(model), None, 0

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            totals[index] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).sum().item()
        return record

    totals = [0.0] * len(layers)
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device, training = next(model.parameters()).device, model.training
    model.eval()
    try:
        for item in items:
            ids = torch.tensor([item["input_ids"]], device=device)
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return [t / max(count, 1) for t in totals], count


def layers_to_drop(scores: list[float], layer_params: int, total_params: int, p: PruneConfig) -> list[int]:
    """The indices of the least influential layers: prune.layers of them, or the fewest that bring the model to
    prune.target_params or below."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    n = p.layers if p.layers is not None else -(-(total_params - p.target_params) // layer_params)
    if n <= 0:
        raise UserError(f"prune.target_params={p.target_params:g}: the model has {total_params:,} parameters "
                        "(within the target already): no layer needs to go. Give a smaller target, or prune.layers=N.")
    if n >= len(scores):
        why = (f"prune.layers={p.layers}" if p.layers is not None else
               f"prune.target_params={p.target_params:g} ({total_params / 1e9:.3g}B now, {layer_params / 1e6:.3g}M a layer)")
        raise UserError(f"{why} would drop {n} of the model's {len(scores)} decoder layers: at least one must stay. "
                        f"Drop at most {len(scores) - 1}.")
    return sorted(order[:n])


def drop_layers(model, drop: list[int]) -> None:
    """Remove these decoder layers in place: the config's depth and its per-layer lists follow (those with one entry a
    layer; lists of layer indices, such as Qwen-MoE's mlp_only_layers, are not remapped), and each remaining
    attention's layer index (its slot in the KV cache) is renumbered."""
    layers, config = decoder_layers(model), model.config.get_text_config()
    depth = len(layers)
    keep = [i for i in range(depth) if i not in set(drop)]
    layers_kept = [layers[i] for i in keep]
    for i in sorted(drop, reverse=True):
        del layers[i]
    for key, value in list(vars(config).items()):  # one entry per layer: layer_types, no_rope_layers, ...
        if "layer" in key and isinstance(value, list) and len(value) == depth:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    for new, layer in enumerate(layers_kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new


def source_model(run):
    """(model in 16 bits on the CPU or the GPU, tokenizer, where it came from): a run's merged/, or its base with the
    adapter merged in; or, for Run.for_base, the recipe's base model. Loaded as `generate` and `eval` load them."""
    if run.is_base:
        loaded = run.load_for_inference(quant="none")
        return loaded.model, loaded.tokenizer, run.cfg.model.name_or_path
    if (run.merged_dir / "config.json").is_file():
        loaded = run.load_for_inference(quant="none", merged=True)
        return loaded.model, loaded.tokenizer, str(run.merged_dir)
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"prune run={run.dir}: the run has neither merged/ nor adapter/ to prune (a full fine-tune's "
                        f"model/ is pruned with prune model.name_or_path={run.dir / 'model'}).")
    loaded = run.load_for_inference(quant="none")
    return loaded.model.merge_and_unload(), loaded.tokenizer, f"{run.cfg.model.name_or_path} + {run.adapter_dir}"


def measured(model, tokenizer, rows, cfg: FinetuneConfig) -> dict:
    """Eval loss and, for conversations, exact match of the greedy answers on the eval rows."""
    from finetune.scoring import eval_loss, scored_answers

    figures = {"eval_loss": eval_loss(model, tokenizer, rows, cfg.data, cfg.train.eval_batch_size, "prune")["loss"]}
    if "messages" in rows.column_names and cfg.eval.exact_match_samples:
        figures["exact_match"] = scored_answers(model, tokenizer, rows.select(range(min(len(rows), cfg.eval.exact_match_samples))),
                                                cfg.eval, "prune")["exact_match"]
    return figures


def prune(cfg: FinetuneConfig, run=None) -> tuple[Path, dict]:
    """Score, drop, measure and write; returns (the pruned model's folder, its report, also in prune.json there)."""
    from finetune.data import check_rows, load_splits
    from finetune.scoring import loss_items

    p = cfg.prune
    if (p.layers is None) == (p.target_params is None):
        raise UserError("`prune` needs one of prune.layers=N (the number of decoder layers to drop) or "
                        "prune.target_params=P (the most parameters the pruned model may keep).")
    from finetune.plan import planned_gpu
    from finetune.run import Run

    gpu = planned_gpu(cfg.plan.gpu, "prune.json's plan")  # before anything runs
    run = run or Run.for_base(cfg)
    out = Path(p.output_dir or run.dir / "pruned")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} is not empty: choose another prune.output_dir, or overwrite=true to replace it.")
    rows = check_rows(load_splits(cfg.data, cfg.train.seed))
    model, tokenizer, source = source_model(run)
    items = loss_items(tokenizer, rows.select(range(min(len(rows), p.samples))), cfg.data)
    scores, scored_tokens = block_influence(model, items)
    total = sum(t.numel() for t in model.parameters())
    layer_params = sum(t.numel() for t in decoder_layers(model)[0].parameters())
    drop = layers_to_drop(scores, layer_params, total, p)
    before = measured(model, tokenizer, rows, cfg)
    drop_layers(model, drop)
    after = measured(model, tokenizer, rows, cfg)
    report = {"source": source, "source_run": None if run.is_base else str(run.dir.resolve()),
              "source_model": cfg.model.name_or_path, "scores": scores,
              "scored_tokens": scored_tokens, "dropped": drop, "layers_before": len(scores),
              "layers_after": len(scores) - len(drop), "params_before": total,
              "params_after": sum(t.numel() for t in model.parameters()), "before": before, "after": after}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    report["plan"] = planned(cfg, out, gpu)
    (out / "prune.json").write_text(json.dumps(report, indent=1))
    log.info("prune: dropped layers %s of %d (block influence %s); %s -> %s", drop, len(scores),
             ", ".join(f"{s:.3f}" for s in scores), before, after)
    return out, report


def planned(cfg: FinetuneConfig, pruned: Path, gpu: Optional[str]) -> Optional[dict]:
    """`plan`'s figures for the model before and after on `gpu` (none without one): parameters, the peak and tokens/s
    of the recipe's training (what healing runs), and the peak and decode tokens/s of inference."""
    from finetune.config import ModelConfig
    from finetune.plan import make_plan, pick_gpu

    if gpu is None:
        return None

    def figures(model_cfg) -> dict:
        c = dataclasses.replace(cfg, model=model_cfg, distill=dataclasses.replace(cfg.distill, teacher=None))
        train, serve = make_plan(c, gpu, "train"), make_plan(c, gpu, "inference")
        return {"params": train["params"], "train_peak_gib": train["peak_gib"],
                "train_tokens_per_second": train["tokens_per_second"], "inference_peak_gib": serve["peak_gib"],
                "decode_tokens_per_second": serve["decode_tokens_per_second"]}

    try:
        before, after = figures(cfg.model), figures(ModelConfig(name_or_path=str(pruned)))
    except UserError as e:  # the settings do not plan on that GPU (bf16 on a T4): the pruned model stands
        log.info("prune: no plan on %s (%s)", gpu, e)
        return None
    return {"gpu": pick_gpu(gpu).name, "before": before, "after": after,
            "train_speedup": after["train_tokens_per_second"] / before["train_tokens_per_second"],
            "decode_speedup": after["decode_tokens_per_second"] / before["decode_tokens_per_second"]}


def heal(cfg: FinetuneConfig, pruned: Path, run=None) -> Optional[dict]:
    """prune.heal=sft: a LoRA run of the recipe on the pruned model (the recipe's own settings), into pruned/heal;
    prune.heal=distill: the same run taught by the unpruned model (the run's, or the recipe's base), finetune.distill."""
    if cfg.prune.heal == "none":
        return None
    from finetune import pipeline

    if cfg.prune.heal == "distill":
        cfg.distill.teacher = str(run.dir) if run is not None else cfg.model.name_or_path
    cfg.model.name_or_path, cfg.model.tokenizer = str(pruned), str(pruned)
    cfg.output_dir = str(pruned / "heal")
    return pipeline.train(cfg)
