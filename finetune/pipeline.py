"""`train`: the recipe, top to bottom.

config -> run directory -> device -> tokenizer -> data -> 4-bit base -> LoRA + SFT trainer
-> eval of the untouched base -> train -> eval -> export -> summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from finetune import distributed
from finetune.data import load_splits
from finetune.data.templates import apply_chat_template_choice
from finetune.config import FinetuneConfig
from finetune.errors import Preempted, UserError
from finetune.evaluate import exact_match
from finetune.export import MergeRejected, export_artifacts
from finetune.lora import build_peft_config, count_parameters
from finetune.model import detect_device, load_base_model, load_tokenizer
from finetune.registry import to_dict, to_yaml
from finetune.tracking import (MetricsLog, finish_wandb, log_model, peak_memory_gb, peak_memory_reserved_gb, plot_loss,
                               start_wandb, wandb_link)
from finetune.data.tokenize import tokenize
from finetune.trainer import (MetricsCallback, NonFiniteGuard, PreemptionGuard, build_sft_config, build_trainer,
                              checkpoint_processes, last_good_checkpoint, packing_efficiency, unmark_prepared)

log = logging.getLogger("finetune")


def check_run_dir(cfg: FinetuneConfig, processes: int = 1) -> tuple[Path, str | None]:
    """The run directory and the checkpoint to resume from; writes nothing. An existing run is never
    overwritten unless overwrite=true; a checkpoint resumes with as many processes as wrote it."""
    run_dir = Path(cfg.output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir={run_dir} is a file, not a folder: choose another output_dir.")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if cfg.resume:
        ckpts = run_dir / "checkpoints"
        resume_from = last_good_checkpoint(ckpts) if ckpts.is_dir() else None
        if resume_from is None:
            raise UserError(f"resume=true but {ckpts} holds no checkpoint to resume from: "
                            "drop resume=true to start a new run.")
        wrote = checkpoint_processes(resume_from)
        if wrote != processes:  # the data order and each process's random state depend on the count
            raise UserError(f"{Path(resume_from).name} was written by {wrote} process(es) and this launch has "
                            f"{processes}: resume with the same number, "
                            + ("python -m finetune ... resume=true" if wrote == 1 else
                               f"accelerate launch --num_processes {wrote} ... -m finetune ... resume=true") + ".")
        return run_dir, resume_from
    if busy and not cfg.overwrite:
        raise UserError(f"output_dir={run_dir} already holds a run and is never overwritten by default: pass "
                        "resume=true to continue it, overwrite=true to replace it, or choose another output_dir=...")
    return run_dir, None


def check_launch(cfg: FinetuneConfig, world: distributed.World, device_type: str) -> None:
    """What the launch (`accelerate launch` and its config) cannot do with this recipe on this machine."""
    if world.strategy == "fsdp" and device_type != "cuda":
        raise UserError("An FSDP config (configs/accelerate/fsdp*.yaml) needs CUDA GPUs: without them accelerate would "
                        "quietly run data parallel instead. On CPUs use --config_file configs/accelerate/ddp.yaml.")
    if world.strategy == "fsdp" and cfg.quant.method == "int8":
        raise UserError("quant=int8 cannot be sharded by FSDP (LLM.int8 weights are integers, FSDP shards floating-point "
                        "tensors): use quant=nf4 with configs/accelerate/fsdp_qlora.yaml, or keep int8 under "
                        "configs/accelerate/ddp.yaml.")


def check_start(cfg: FinetuneConfig, world: distributed.World, device_type: str) -> tuple[Path, str | None]:
    """The launch and the run directory (main process only under accelerate launch)."""
    check_launch(cfg, world, device_type)
    return check_run_dir(cfg, world.size)


def create_run_dir(cfg: FinetuneConfig, run_dir: Path) -> None:
    """Create the run directory (emptied first with overwrite=true) and write config.yaml."""
    try:
        if cfg.overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    except OSError as e:
        raise UserError(f"output_dir={run_dir}: cannot write there ({e.strerror}). Choose a writable output_dir.") from None


def train(cfg: FinetuneConfig) -> dict:
    # Device first: a setting the machine cannot run (bf16 on a T4, fp16 on a CPU) fails before any download.
    device = detect_device(cfg.train, cfg.quant, cfg.model)
    # Under `accelerate launch`, one process per GPU: they share rank 0's run directory (a ${now:...} name
    # differs by the second between processes), and only rank 0 writes files, W&B and the Hub.
    world = distributed.init(cpu=device.type == "cpu")
    cfg.output_dir = distributed.broadcast(cfg.output_dir)
    if world.distributed:
        log.info("accelerate launch: %d processes (%s)", world.size, world.strategy.upper())
    # Everything a user can get wrong is checked before anything is written: a typo leaves no run behind.
    run_dir, resume_from = distributed.on_main(lambda: check_start(cfg, world, device.type))
    log.info("device: %s, precision %s", device.describe(), device.precision)
    fitted = None
    if cfg.train.auto_fit:  # the plan picks micro-batch and checkpointing for this GPU, same effective batch
        from finetune.plan import auto_fit

        fitted = auto_fit(cfg, world.size, world.strategy)
        log.info("auto_fit: %s", ", ".join(f"{k}={v}" for k, v in fitted.items()))
    if cfg.hub.push:  # a missing or rejected token fails now, not after hours of training
        from finetune.publish import check_access

        who = distributed.on_main(lambda: check_access(cfg.hub))
        log.info("Hugging Face Hub: publishing to %s as %s at the end", cfg.hub.repo_id, who)

    # Tokenizer before data: rows are checked and formatted with its chat template. Rank 0 goes first (downloads,
    # reports bad rows, fills datasets' cache); the others then read the cache.
    with distributed.main_process_first():
        tokenizer = load_tokenizer(cfg.model)
        template = apply_chat_template_choice(tokenizer, cfg.data.chat_template)
        splits = load_splits(cfg.data, cfg.train.seed)
        log.info("data: %s format, %d train rows, %d eval rows (%s); chat template: %s", splits.format,
                 len(splits.train), len(splits.eval) if splits.eval is not None else 0, splits.eval_source, template)
        if cfg.eval.exact_match_samples and not splits.conversational:  # known now, before the costly tokenization
            raise UserError(f"eval.exact_match_samples={cfg.eval.exact_match_samples} scores assistant replies, but "
                            f"the data is in the {splits.format} format: set eval.exact_match_samples=0.")
        train_tok = tokenize(splits.train, tokenizer, cfg.data, "train", splits.conversational)
        eval_tok = tokenize(splits.eval, tokenizer, cfg.data, "eval", splits.conversational) if splits.eval is not None else None

    # The inputs are good: now the run directory, and tracking (so a typo leaves no empty W&B run behind).
    distributed.barrier()  # every process has checked the run directory before rank 0 writes into it
    wandb_run = None
    if world.is_main:
        create_run_dir(cfg, run_dir)
        wandb_run = start_wandb(cfg.tracking, run_dir, to_dict(cfg) | {"processes": world.size})
    distributed.barrier()
    metrics = MetricsLog(run_dir / "metrics.jsonl")

    # The base model, quantized on load; SFTTrainer wraps it in the LoRA adapter (B = 0, so it is still the base).
    # Under FSDP the model is complete only once the Trainer has sharded it, as training starts: the base is
    # evaluated there (eval_on_start), by all processes. Greedy generation would bypass FSDP's root module, so
    # exact match is not measured under FSDP.
    sharded = world.strategy == "fsdp"
    if sharded and cfg.eval.exact_match_samples:
        log.info("eval.exact_match_samples=%d: exact match is not measured under FSDP (generation needs the whole "
                 "model in one process); the eval loss is.", cfg.eval.exact_match_samples)
    model = load_base_model(cfg.model, cfg.quant, device, world=world)
    args = build_sft_config(cfg.train, cfg.data, device, run_dir / "checkpoints",
                            report_to="wandb" if wandb_run is not None else "none", run_name=run_dir.name,
                            eos_token=tokenizer.eos_token, has_eval=eval_tok is not None,
                            eval_on_start=sharded and resume_from is None and eval_tok is not None)
    trainer = build_trainer(model, tokenizer, train_tok.dataset, eval_tok.dataset if eval_tok else None,
                            build_peft_config(cfg.lora), args, [MetricsCallback(metrics, device.type)])
    packed = packing_efficiency(trainer.train_dataset, cfg.data.max_length) if cfg.data.packing else None
    if packed is not None:
        log.info("packing: %d rows in %d sequences of %d tokens, %.1f%% of the slots filled", len(train_tok.dataset),
                 len(trainer.train_dataset), cfg.data.max_length, 100 * packed)
    else:
        check_rows_kept(len(train_tok.dataset), len(trainer.train_dataset), cfg.data.max_length)
    trainable, total = count_parameters(trainer.model)
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    # The untouched base on the eval split: the yardstick for the tuned model.
    if sharded:
        before = {"eval_loss": None, "exact_match": None, "examples": []}
    else:
        before = evaluate(cfg, trainer, tokenizer, splits, metrics, world.is_main)
        unmark_prepared(trainer)

    guard, finite = PreemptionGuard(), NonFiniteGuard(cfg.train.max_bad_steps, run_dir / "checkpoints")
    trainer.add_callback(guard)
    trainer.add_callback(finite)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise out_of_memory(cfg, run_dir) from None
    if guard.signal:  # the checkpoint of this step is written: stop here, resume=true continues
        raise Preempted(guard.signal, trainer.state.global_step,
                        str(run_dir / "checkpoints" / f"checkpoint-{trainer.state.global_step}"), str(run_dir))

    if args.eval_on_start:
        before["eval_loss"] = next(r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r)
    after = evaluate(cfg, trainer, tokenizer, splits, metrics, world.is_main, generate=not sharded)
    train_runtime = result.metrics["train_runtime"]
    train_tokens = int(getattr(trainer, "_total_train_tokens", 0)) or None  # counted by TRL (non-padding tokens)
    summary = {
        "recipe": cfg.recipe,
        "base_model": cfg.model.name_or_path,
        "quantization": cfg.quant.method,
        "train_loss": result.metrics.get("train_loss"),
        "eval_loss_base": before["eval_loss"],
        "eval_loss": after["eval_loss"],
        "exact_match_base": before["exact_match"],
        "exact_match": after["exact_match"],
        "train_tokens": train_tokens,
        "train_runtime_s": train_runtime,
        "tokens_per_second": train_tokens / train_runtime if train_tokens else None,
        "peak_memory_gb": peak_memory_gb(device.type),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "peak_memory_reserved_gb": peak_memory_reserved_gb(device.type),
        "device": device.describe(),
        "precision": device.precision,
        "trainable_params": trainable,
        "total_params": total,
        "gpu_hours": train_runtime / 3600 if device.type == "cuda" else None,
        "steps": trainer.state.global_step,
        # sequences per optimizer step: micro-batch x accumulation x processes
        "effective_batch": cfg.train.micro_batch_size * cfg.train.grad_accum * world.size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "processes": world.size,
        "distributed": None if world.strategy == "single" else world.strategy,
        "skipped_bad_steps": finite.bad_steps,
        "auto_fit": fitted,
        "optimizer": describe_optimizer(trainer.optimizer),
        "gradient_checkpointing": is_checkpointing(trainer.model),
        "quantized_layers": count_quantized_layers(trainer.model),
        "chat_template": template,
        "data_format": splits.format,
        "rows_dropped": dict(splits.dropped) | ({"too long": train_tok.too_long} if cfg.data.too_long == "drop" and train_tok.too_long else {}),
        "rows_truncated": train_tok.too_long if cfg.data.too_long == "truncate" else 0,
        "packing_efficiency": packed,
        "exact_match_examples": after["examples"],
        **wandb_link(wandb_run),
    }

    # Export: the adapter always; merged/ (never from 4-bit weights) checked against the model as trained.
    # Under FSDP each process holds a shard: the adapter is gathered, and the model as trained is run by all.
    rows = splits.eval if splits.eval is not None else splits.train
    gathered = gather_for_export(cfg, trainer, tokenizer, rows) if world.strategy == "fsdp" else {}
    if not world.is_main:
        return summary
    rejected, export_start = None, time.time()
    reset_peak_memory(device.type)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model) if sharded else trainer.model
        export_artifacts(cfg, run_dir, model, tokenizer, rows, summary,
                         f"python -m finetune export run={run_dir}", **gathered)
    except MergeRejected as e:  # the run and its adapter are kept; the user is told at the end
        rejected = e
    # GPU memory the export itself needed (the merge runs in CPU memory), or the process's peak RSS on CPU
    summary.update(export_runtime_s=time.time() - export_start, export_peak_memory_gb=peak_memory_gb(device.type))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_loss(metrics.read(), run_dir / "loss.png", f"{cfg.recipe}: {cfg.model.name_or_path.split('/')[-1]}")
    if cfg.tracking.log_model:
        log_model(wandb_run, run_dir / ("adapter" if cfg.lora.enabled else "model"), cfg.recipe, summary)
    finish_wandb(wandb_run, summary)
    if rejected is not None:
        raise rejected
    if cfg.hub.push:
        from finetune.publish import publish

        try:
            summary["hub_commit_url"] = publish(run_dir, cfg, summary)
        except UserError as e:
            raise UserError(f"{e} The run in {run_dir} is complete; publish it later with: python -m finetune "
                            f"publish run={run_dir} hub.repo_id={cfg.hub.repo_id}") from None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def gather_for_export(cfg: FinetuneConfig, trainer, tokenizer, rows) -> dict:
    """FSDP: the full state dict (on rank 0) and, for a merge, the logits of the model as trained on the check
    samples; every process takes part."""
    from finetune.export import check_samples, logits_of

    out = {"state_dict": trainer.accelerator.get_state_dict(trainer.model)}
    if cfg.export.merge and cfg.lora.enabled:
        samples = check_samples(tokenizer, rows, cfg.export.check_samples, cfg.data.train_on_inputs)
        out["reference"] = logits_of(trainer.model, samples)
    return out


def out_of_memory(cfg: FinetuneConfig, run_dir: Path) -> UserError:
    """CUDA ran out of memory in training: the peak and what is free, the plan's cheapest change that fits,
    and how to continue."""
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_reserved()
    fix = ("set a smaller train.micro_batch_size (with a larger train.grad_accum), train.gradient_checkpointing=true "
           "or a shorter data.max_length")
    try:
        from finetune.plan import make_plan

        plan = make_plan(cfg, gpu_name="auto", mode="train")
        if plan["suggestions"]:
            s = plan["suggestions"][0]
            fix = f"{s['change']} (planned peak {s['peak_gib']:.1f} GiB): {' '.join(s['overrides'])}"
    except Exception:  # the plan is advice: the error must be reported whatever happens to it
        pass
    last = last_good_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    resume = (f"then continue from {Path(last).name} with resume=true" if last else
              "no checkpoint was written yet, so start again with overwrite=true")
    return UserError(f"CUDA out of memory in training: peak {peak / 2**30:.1f} GiB reserved, {free / 2**30:.1f} of "
                     f"{total / 2**30:.1f} GiB free now. Cheapest fix: {fix}; {resume}. "
                     f"`python -m finetune plan` shows the whole breakdown.")


def check_rows_kept(before: int, after: int, max_length: int) -> None:
    """With data.too_long=truncate, TRL drops rows whose trained tokens were all cut off: say so, stop if none are left."""
    if after == 0:
        raise UserError(f"All {before} training rows lost every trained token to truncation at data.max_length="
                        f"{max_length}: the replies start after token {max_length}. Raise data.max_length.")
    if after < before:
        log.warning("%d of %d training rows were dropped: their replies start after data.max_length=%d tokens.",
                    before - after, before, max_length)


def evaluate(cfg: FinetuneConfig, trainer, tokenizer, splits, metrics: MetricsLog, is_main: bool = True,
             generate: bool = True) -> dict:
    """Eval loss on the eval split (the trainer logs it to metrics.jsonl and W&B), and the exact-match
    score of greedy answers where asked for."""
    out = {"eval_loss": None, "exact_match": None, "examples": []}
    if splits.eval is None:
        return out
    # With train.eval_steps the trainer has just evaluated at its last step: reuse that, don't run it twice.
    done = [r["eval_loss"] for r in trainer.state.log_history
            if "eval_loss" in r and r.get("step") == trainer.state.global_step and trainer.state.global_step > 0]
    out["eval_loss"] = done[-1] if done else trainer.evaluate()["eval_loss"]
    if cfg.eval.exact_match_samples and generate:
        rows = splits.eval.select(range(min(cfg.eval.exact_match_samples, len(splits.eval))))
        em = exact_match(trainer.model, tokenizer, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        out["exact_match"], out["examples"] = em["exact_match"], em["examples"]
        if is_main:
            metrics.append({"step": trainer.state.global_step, "exact_match": em["exact_match"], "n": em["n"]})
        if is_main and "wandb" in trainer.args.report_to:
            import wandb

            wandb.log({"eval/exact_match": em["exact_match"]})
    return out


def reset_peak_memory(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5.2x renamed the attribute."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(model, name):
            return bool(getattr(model, name))
    return False


def describe_optimizer(optimizer) -> dict:
    """What the trainer actually built: class, and for bitsandbytes its state bits and paging."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    desc = {"class": f"{type(inner).__module__}.{type(inner).__name__}"}
    args = getattr(inner, "args", None)
    if args is not None:
        desc["optim_bits"] = getattr(args, "optim_bits", None)
        desc["is_paged"] = bool(getattr(inner, "is_paged", False))
    return desc


def count_quantized_layers(model) -> dict:
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
