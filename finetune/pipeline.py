"""`train`: the recipe, top to bottom.

    prepare   device and processes, every check, tokenizer and data, then the run directory and tracking
    build     the base quantized on load, LoRA and TRL's SFT trainer
    measure   the untouched base on the eval split: the yardstick
    fit       train, with the preemption and non-finite guards
    measure   the tuned model
    finish    summary.json, adapter/ and merged/ (finetune.export), loss.png, W&B, the Hub

Several processes (`accelerate launch`) run the same stages; what differs for them is finetune.distributed's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from finetune import distributed
from finetune.config import FinetuneConfig
from finetune.data import Splits, check_objective, check_paths, check_rows, chosen_rows, load_splits
from finetune.data.pairs import tokenize_pairs
from finetune.data.templates import apply_chat_template_choice, use_end_of_turn
from finetune.data.tokenize import Tokenized, tokenize
from finetune.errors import Preempted, UserError, write_error
from finetune.export import MergeRejected, export_artifacts
from finetune.lora import build_peft_config, count_parameters, initial_adapter
from finetune.gguf import check_export
from finetune.model import (Device, attach_adapter, check_skeleton, detect_device, fit_cpu_threads,
                            load_base_model, weights_dtype)
from finetune.registry import to_dict
from finetune.checkpoints import checkpoint_step, finished, last_good_checkpoint
from finetune.run import Run
from finetune.scoring import exact_match, pair_logps, preference_figures
from finetune.tokenizer import load_tokenizer
from finetune.tracking import (MetricsLog, finish_wandb, log_model, peak_memory_gb, peak_memory_reserved_gb, plot_loss,
                               start_wandb, wandb_link)
from finetune.trainer import (MetricsCallback, NonFiniteGuard, PreemptionGuard, RunTotals, build_dpo_config,
                              build_orpo_config, build_sft_config, build_trainer, optimizer_of, packing_efficiency,
                              settle_liger, settle_padding_free, unmark_prepared)

log = logging.getLogger("finetune")


@dataclass
class Session:
    """What the stages share: the config, where it runs, the data, and (on the main process) the run."""
    cfg: FinetuneConfig
    device: Device
    world: distributed.World
    run_dir: Path
    resume_from: Optional[str]
    auto_fit: Optional[dict]
    tokenizer: object = None
    template: str = ""
    splits: Optional[Splits] = None
    train_tok: Optional[Tokenized] = None
    eval_tok: Optional[Tokenized] = None
    run: Optional[Run] = None          # the main process's; the others write nothing
    wandb_run: object = None
    metrics: Optional[MetricsLog] = None
    params: tuple = (0, 0)             # (trainable, total)
    packing: Optional[float] = None    # share of the packed sequences' slots filled (data.packing)
    concatenation_kl: Optional[float] = None  # the model's logits padded vs concatenated (settle_padding_free)
    reasoning: bool = False            # the training replies carry reasoning (trained to think first)
    bad_steps: list = field(default_factory=list)
    totals: Optional[RunTotals] = None  # tokens and seconds of training over the whole run, across resumes
    teacher: object = None             # distill.teacher resolved (finetune.distill.Teacher)
    teacher_tokens: int = 0            # the tokens its pass covered
    init_adapter: Optional[Path] = None  # init_from's adapter/, trained on from where that run left it


def train(cfg: FinetuneConfig) -> dict:
    s = prepare(cfg)
    try:
        trainer = build(s)
        before = measure_base(s, trainer)
        result = fit(s, trainer)
        after = measure(s, trainer, generate=not s.world.sharded)
        return finish(s, trainer, summarize(s, trainer, result, before, after))
    except Exception as e:  # metrics.jsonl, loss.png, summary.json: a full disk or a read-only folder mid-run
        reason = write_error(e)
        if reason is None:
            raise
        raise UserError(f"Could not write to {s.run_dir} ({reason}): free space or fix the folder's "
                        "permissions, then continue with resume=true from the last checkpoint.") from None
    finally:
        if s.run:
            s.run.unlock()  # however the run ends; after a kill -9 the next start takes the stale lock over


# ---- prepare ------------------------------------------------------------------------------------

def prepare(cfg: FinetuneConfig) -> Session:
    # Cheap checks first: local files, then the device (bf16 on a T4, fp16 on a CPU), before any download.
    check_paths(cfg.data)
    if cfg.model.offload != "none":
        raise UserError(f"model.offload={cfg.model.offload} is for generate and eval (layers stream in for each forward, "
                        "and cannot train there). To train in less GPU memory: train.activation_offloading=true, a paged "
                        "optimizer (train.optim=paged_adamw_8bit), quant=nf4; `python -m finetune plan` weighs them.")
    device = detect_device(cfg.train, cfg.quant, cfg.model)
    if device.type == "cpu" and not cfg.train.allow_cpu:
        check_cpu_time(cfg)
    # Under `accelerate launch`, one process per GPU: they share rank 0's run directory (a ${now:...} name
    # differs by the second between processes), and only rank 0 writes files, W&B and the Hub.
    world = distributed.init(cpu=device.type == "cpu")
    cfg.output_dir = distributed.broadcast(cfg.output_dir)
    init_adapter = initial_adapter(cfg)  # init_from: its adapter's LoRA settings become this run's (resume compares)
    # Everything a user can get wrong is checked before anything is written: a typo leaves no run behind.
    run_dir, resume_from = distributed.on_main(lambda: check_start(cfg, world, device.type))
    check_skeleton(cfg.model, cfg.quant, cfg.lora)  # a typo is said before any weight is loaded
    check_export(cfg.model, cfg.export)  # llama.cpp's tools, where GGUF files are asked for
    log.info("device: %s, precision %s", device.describe(), device.precision)
    s = Session(cfg, device, world, run_dir, resume_from, fit_to_gpu(cfg, world), init_adapter=init_adapter)
    if cfg.hub.push:  # a missing or rejected token fails now, not after hours of training
        from finetune.publish import check_access

        who = distributed.on_main(lambda: check_access(cfg.hub))
        log.info("Hugging Face Hub: publishing to %s as %s at the end", cfg.hub.repo_id, who)
    # Rank 0 goes first (downloads, reports bad rows, fills datasets' cache); the others then read the cache.
    with distributed.main_process_first():
        load_data(s)
    if cfg.distill.teacher:  # the teacher checked against the student's tokenizer before anything is written
        from finetune.distill import check_teacher

        s.teacher = check_teacher(cfg.distill, cfg.data, device, s.tokenizer)
    # The inputs are good: now the run directory, and tracking (so a typo leaves no empty W&B run behind).
    distributed.barrier()  # every process has checked the run directory before rank 0 writes into it
    if world.is_main:
        start_run(s)
    distributed.barrier()
    s.metrics = MetricsLog(run_dir / "metrics.jsonl")
    if resume_from and world.is_main:
        s.metrics.keep_until(checkpoint_step(resume_from))
    return s


def start_run(s: Session) -> None:
    """The run directory, locked by this process, and its W&B run (the lock goes if W&B cannot start)."""
    s.run = Run.create(s.cfg, s.run_dir)
    try:
        s.wandb_run = start_wandb(s.cfg.tracking, s.run_dir, to_dict(s.cfg) | {"processes": s.world.size})
    except BaseException:
        s.run.unlock()
        raise


CPU_HOURS_MAX = 1.0  # more than this on a CPU, and training needs train.allow_cpu=true


def check_cpu_time(cfg: FinetuneConfig) -> None:
    """No GPU here: a recipe that would train for hours on this CPU (a 7B model: days) is refused, with plan's
    estimate, unless train.allow_cpu=true says it is meant."""
    from finetune.plan import cpu_estimate

    estimate = cpu_estimate(cfg, CPU_HOURS_MAX)
    if estimate and estimate["hours"] > CPU_HOURS_MAX:
        raise UserError(f"No CUDA GPU was found, and {cfg.model.name_or_path} ({estimate['params'] / 1e9:.2g}B "
                        f"parameters) would train here for at least {estimate['hours']:,.0f} hours ({estimate['steps']} "
                        f"steps, from {estimate['steps_from']}; the CPU's measured peak). Train on a GPU "
                        f"(python -m finetune plan recipe={cfg.recipe} plan.gpu=rtx3060 says whether one fits), or set "
                        "train.allow_cpu=true to train on this CPU anyway.")


def check_start(cfg: FinetuneConfig, world: distributed.World, device_type: str) -> tuple[Path, Optional[str]]:
    """The launch and the run directory (main process only under accelerate launch)."""
    distributed.check_launch(cfg, world, device_type)
    return Run.check_new(cfg, world.size)


def fit_to_gpu(cfg: FinetuneConfig, world: distributed.World) -> Optional[dict]:
    """train.auto_fit: the plan picks micro-batch and checkpointing for this GPU, same effective batch."""
    if not cfg.train.auto_fit:
        return None
    from finetune.plan import auto_fit

    fitted = auto_fit(cfg, world.size, world.strategy)
    log.info("auto_fit: %s", ", ".join(f"{k}={v}" for k, v in fitted.items()))
    return fitted


def load_data(s: Session) -> None:
    """Tokenizer before data: rows are checked and formatted with its chat template, then tokenized (cached)."""
    cfg = s.cfg
    s.tokenizer = load_tokenizer(cfg.model)
    s.template = apply_chat_template_choice(s.tokenizer, cfg.data.chat_template)
    s.splits = splits = load_splits(cfg.data, cfg.train.seed)
    check_objective(splits, cfg.train.objective, f"data.path={cfg.data.path}" if cfg.data.path else "data.sources")
    log.info("data: %s format, %d train rows, %d eval rows (%s); chat template: %s", splits.format,
             len(splits.train), len(splits.eval) if splits.eval is not None else 0, splits.eval_source, s.template)
    if cfg.eval.exact_match_samples and not splits.chat:  # known now, before the costly tokenization
        raise UserError(f"eval.exact_match_samples={cfg.eval.exact_match_samples} scores assistant replies, but "
                        f"the data is in the {splits.format} format: set eval.exact_match_samples=0.")
    if splits.chat:
        use_end_of_turn(s.tokenizer)
    if splits.conversational:
        s.reasoning = has_reasoning(splits.train)
    if splits.preference:
        s.train_tok = tokenize_pairs(splits.train, s.tokenizer, cfg.data, "train", splits.train_where)
        if splits.eval is not None:
            s.eval_tok = tokenize_pairs(splits.eval, s.tokenizer, cfg.data, "eval", splits.eval_where)
        return
    s.train_tok = tokenize(splits.train, s.tokenizer, cfg.data, "train", splits.conversational, splits.train_where)
    if splits.eval is not None:
        s.eval_tok = tokenize(splits.eval, s.tokenizer, cfg.data, "eval", splits.conversational, splits.eval_where)


def has_reasoning(rows) -> bool:
    """Whether any assistant turn of these conversations carries reasoning (reasoning_content / thinking)."""
    if "reasoning_content" not in str(rows.features["messages"]):
        return False
    return any(m.get("reasoning_content") for messages in rows["messages"] for m in messages)


# ---- build --------------------------------------------------------------------------------------

def build(s: Session):
    """The base model, quantized on load (and init_from's adapter on it); the objective's trainer wraps it in the LoRA
    adapter (B = 0: still the base)."""
    cfg = s.cfg
    if s.world.sharded and cfg.eval.exact_match_samples:
        log.info("eval.exact_match_samples=%d: exact match is not measured under FSDP (generation needs the whole "
                 "model in one process); the eval loss is.", cfg.eval.exact_match_samples)
    if s.teacher is not None:  # the teacher's pass first: it is let go before the student is loaded
        from finetune.distill import teach

        s.train_tok.dataset, s.teacher_tokens = teach(s.teacher, cfg.distill, s.train_tok.dataset)
    model = load_base_model(cfg.model, cfg.quant, s.device, dtype=weights_dtype(cfg.train, cfg.lora, s.device),
                            world=s.world)
    if s.init_adapter is not None:
        model = attach_adapter(model, s.init_adapter, trainable=True)
    preference = cfg.train.objective != "sft"
    s.concatenation_kl = None if preference else settle_padding_free(cfg.data, model, s.train_tok.dataset,
                                                                       s.world.sharded)
    settle_liger(cfg.train, s.device.type, model)
    has_eval = s.eval_tok is not None
    args = training_config(s, has_eval)
    trainer = build_trainer(model, s.tokenizer, s.train_tok.dataset, s.eval_tok.dataset if has_eval else None,
                            None if s.init_adapter else build_peft_config(cfg.lora), args,
                            [MetricsCallback(s.metrics, s.device.type)], optimizer=optimizer_of(cfg.train, args),
                            distill=cfg.distill if cfg.distill.teacher else None, objective=cfg.train.objective)
    if cfg.data.packing:
        s.packing = packing_efficiency(trainer.train_dataset, cfg.data.max_length)
        log.info("packing: %d rows in %d sequences of %d tokens, %.1f%% of the slots filled", len(s.train_tok.dataset),
                 len(trainer.train_dataset), cfg.data.max_length, 100 * s.packing)
    elif not preference:  # (a pair whose prompt fills max_length was dropped by finetune.data.pairs)
        check_rows_kept(len(s.train_tok.dataset), len(trainer.train_dataset), cfg.data.max_length)
    s.params = trainable, total = count_parameters(trainer.model)
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    return trainer


def training_config(s: Session, has_eval: bool):
    """The TRL config of train.objective: SFT's, DPO's (a full fine-tune computes its reference before training) or
    ORPO's."""
    cfg = s.cfg
    common = dict(device=s.device, checkpoints=s.run_dir / "checkpoints", run_name=s.run_dir.name,
                  report_to="wandb" if s.wandb_run is not None else "none", has_eval=has_eval,
                  eval_on_start=distributed.base_eval_at_start(s.world, s.resume_from is not None, has_eval))
    if cfg.train.objective == "dpo":
        return build_dpo_config(cfg.train, cfg.data, **common, reference_pass=not cfg.lora.enabled)
    if cfg.train.objective == "orpo":
        return build_orpo_config(cfg.train, cfg.data, **common)
    return build_sft_config(cfg.train, cfg.data, **common, eos_token=s.tokenizer.eos_token,
                            keep_columns=bool(cfg.distill.teacher))


def check_rows_kept(before: int, after: int, max_length: int) -> None:
    """With data.too_long=truncate, TRL drops rows whose trained tokens were all cut off: say so, stop if none are left."""
    if after == 0:
        raise UserError(f"All {before} training rows lost every trained token to truncation at data.max_length="
                        f"{max_length}: the replies start after token {max_length}. Raise data.max_length.")
    if after < before:
        log.warning("%d of %d training rows were dropped: their replies start after data.max_length=%d tokens.",
                    before - after, before, max_length)


# ---- measure ------------------------------------------------------------------------------------

def measure_base(s: Session, trainer) -> dict:
    """The untouched base on the eval split. Under FSDP the Trainer measures it as training starts (the model is
    whole only once sharded), and summarize() reads that figure."""
    if s.world.sharded:
        return {"eval_loss": None, "exact_match": None, "examples": []}
    logged = s.resume_from and distributed.broadcast(logged_base(s.metrics) if s.world.is_main else None)
    if logged:
        log.info("resume: the base's figures are those measured when the run started (metrics.jsonl, step 0)")
        return logged
    before = measure(s, trainer)
    unmark_prepared(trainer)
    return before


def logged_base(metrics: MetricsLog) -> Optional[dict]:
    """The base's eval loss, exact match and preference figures as the run measured them at step 0, or None if it
    did not get there."""
    base = [r for r in metrics.read() if r.get("step") == 0]
    if not any("eval_loss" in r for r in base):
        return None
    keys = ("eval_loss", "exact_match", "preference_accuracy", "preference_margin")
    return {k: next((r[k] for r in base if k in r), None) for k in keys} | {"examples": []}


def measure(s: Session, trainer, generate: bool = True) -> dict:
    """Eval loss on the eval split (the trainer logs it to metrics.jsonl and W&B: for preference pairs, the DPO loss
    and TRL's reward figures), the model's own preference on the eval pairs, and the exact-match score of greedy
    answers where asked for (against a pair's chosen answer)."""
    cfg, out = s.cfg, {"eval_loss": None, "exact_match": None, "examples": []}
    if s.splits.eval is None:
        return out
    # With train.eval_steps the trainer has just evaluated at its last step: reuse that, don't run it twice.
    done = [r["eval_loss"] for r in trainer.state.log_history
            if "eval_loss" in r and r.get("step") == trainer.state.global_step and trainer.state.global_step > 0]
    out["eval_loss"] = done[-1] if done else trainer.evaluate()["eval_loss"]
    if s.splits.preference and not s.world.sharded:  # (the model is whole in each process)
        out |= preference_figures(*pair_logps(trainer.model, s.eval_tok.dataset, s.tokenizer.pad_token_id,
                                              cfg.train.eval_batch_size, cfg.data.max_length))
        log_eval(s, trainer, {k: out[k] for k in ("preference_accuracy", "preference_margin")})
    if cfg.eval.exact_match_samples and generate:
        rows = s.splits.eval.select(range(min(cfg.eval.exact_match_samples, len(s.splits.eval))))
        rows = chosen_rows(rows) if s.splits.preference else rows  # the chosen answer is the reference
        em = exact_match(trainer.model, s.tokenizer, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size, s.reasoning)
        out["exact_match"], out["examples"] = em["exact_match"], em["examples"]
        log_eval(s, trainer, {"exact_match": em["exact_match"]}, n=em["n"])
    return out


def log_eval(s: Session, trainer, figures: dict, **more) -> None:
    """Figures measured outside the Trainer: into metrics.jsonl at this step, and W&B's eval/ panel."""
    if not s.world.is_main:
        return
    s.metrics.append({"step": trainer.state.global_step, **figures, **more})
    if "wandb" in trainer.args.report_to:
        import wandb

        wandb.log({f"eval/{k}": v for k, v in figures.items()})


# ---- fit ----------------------------------------------------------------------------------------

def fit(s: Session, trainer):
    """trainer.train(), resumed where asked. A signal stops it at a checkpoint (Preempted); a CUDA out-of-memory
    error is one message with the cheapest fix; non-finite steps are skipped up to train.max_bad_steps."""
    s.totals = RunTotals.resumed(s.resume_from)
    s.totals.trainer = trainer
    if s.resume_from and finished(s.resume_from, s.cfg.train.epochs, s.cfg.train.max_steps):
        return load_finished(trainer, s.resume_from)
    trainer.add_callback(s.totals)
    if s.device.type == "cpu":
        fit_cpu_threads()
    guard, finite = PreemptionGuard(), NonFiniteGuard(s.cfg.train.max_bad_steps, s.run_dir / "checkpoints")
    trainer.add_callback(guard)
    trainer.add_callback(finite)
    try:
        result = trainer.train(resume_from_checkpoint=s.resume_from)
    except torch.OutOfMemoryError:
        raise out_of_memory(s.cfg, s.run_dir) from None
    if guard.signal:  # the checkpoint of this step is written: stop here, resume=true continues
        raise Preempted(guard.signal, trainer.state.global_step,
                        str(s.run_dir / "checkpoints" / f"checkpoint-{trainer.state.global_step}"), str(s.run_dir))
    s.bad_steps = finite.bad_steps
    return result


def load_finished(trainer, checkpoint: str):
    """The finished run's adapter and state, and its training figures: the loss averaged over its logged steps
    (each log covers the steps since the one before)."""
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = type(trainer.state).load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    log.info("%s is the last step: nothing is left to train; finishing the run", Path(checkpoint).name)
    loss = logged_train_loss(trainer.state.log_history)
    return TrainOutput(trainer.state.global_step, loss, {"train_loss": loss, "train_runtime": 0.0})


def logged_train_loss(log_history: list) -> Optional[float]:
    """The training loss over a run's logged steps, each log weighted by the steps it covers. After a resume the
    Trainer's own train_loss divides the resumed part's losses by every step of the run; this is the whole run's."""
    total, last = 0.0, 0
    for record in (r for r in log_history if "loss" in r):
        total, last = total + record["loss"] * (record["step"] - last), record["step"]
    return total / last if last else None


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
            first = plan["suggestions"][0]
            fix = f"{first['change']} (planned peak {first['peak_gib']:.1f} GiB): {' '.join(first['overrides'])}"
    except Exception:  # the plan is advice: the error must be reported whatever happens to it
        pass
    last = last_good_checkpoint(run_dir / "checkpoints")
    resume = (f"then continue from {Path(last).name} with resume=true" if last else
              "no checkpoint was written yet, so start again with overwrite=true")
    return UserError(f"CUDA out of memory in training: peak {peak / 2**30:.1f} GiB reserved, {free / 2**30:.1f} of "
                     f"{total / 2**30:.1f} GiB free now. Cheapest fix: {fix}; {resume}. "
                     f"`python -m finetune plan` shows the whole breakdown.")


# ---- finish -------------------------------------------------------------------------------------

def summarize(s: Session, trainer, result, before: dict, after: dict) -> dict:
    """summary.json's figures: what was trained, how well, how fast, with what."""
    cfg, device, world, tok = s.cfg, s.device, s.world, s.train_tok
    if trainer.args.eval_on_start:
        before["eval_loss"] = distributed.base_eval_loss(trainer)
    # the whole run's, across resumes; each segment's tokens counted by TRL (non-padding tokens)
    runtime = s.totals.seconds_before + result.metrics["train_runtime"]
    tokens = s.totals.tokens() or None
    return {
        "recipe": cfg.recipe, "base_model": cfg.model.name_or_path, "quantization": cfg.quant.method,
        "objective": cfg.train.objective, "beta": cfg.train.beta if cfg.train.objective != "sft" else None,
        "init_from": cfg.init_from,
        "train_loss": logged_train_loss(trainer.state.log_history) if s.resume_from else result.metrics.get("train_loss"),
        "eval_loss_base": before["eval_loss"], "eval_loss": after["eval_loss"],
        "exact_match_base": before["exact_match"], "exact_match": after["exact_match"],
        **{f"{k}{end}": figures.get(k) for k in ("preference_accuracy", "preference_margin")
           for end, figures in (("_base", before), ("", after))},
        "train_tokens": tokens, "train_runtime_s": runtime, "tokens_per_second": tokens / runtime if tokens else None,
        "peak_memory_gb": peak_memory_gb(device.type),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "peak_memory_reserved_gb": peak_memory_reserved_gb(device.type),
        "device": device.describe(), "precision": device.precision,
        "trainable_params": s.params[0], "total_params": s.params[1],
        "gpu_hours": runtime / 3600 if device.type == "cuda" else None,
        "steps": trainer.state.global_step,
        # sequences per optimizer step: micro-batch x accumulation x processes
        "effective_batch": cfg.train.micro_batch_size * cfg.train.grad_accum * world.size,
        "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
        "processes": world.size, "distributed": None if world.strategy == "single" else world.strategy,
        "skipped_bad_steps": s.bad_steps, "auto_fit": s.auto_fit,
        "optimizer": describe_optimizer(trainer.optimizer),
        "gradient_checkpointing": is_checkpointing(trainer.model),
        "quantized_layers": count_quantized_layers(trainer.model),
        "chat_template": s.template, "data_format": s.splits.format, "reasoning": s.reasoning,
        "rows_dropped": dict(s.splits.dropped + tok.dropped) | ({"too long": tok.too_long} if cfg.data.too_long == "drop" and tok.too_long else {}),
        "rows_truncated": tok.too_long if cfg.data.too_long == "truncate" else 0,
        "packing_efficiency": s.packing,
        "padding_free": cfg.data.padding_free, "concatenation_kl": s.concatenation_kl,
        "liger_kernel": cfg.train.liger_kernel,
        "distill": dataclasses.asdict(cfg.distill) | {"teacher_tokens": s.teacher_tokens} if cfg.distill.teacher else None,
        "exact_match_examples": after["examples"],
        **wandb_link(s.wandb_run),
    }


def finish(s: Session, trainer, summary: dict) -> dict:
    """Export (the adapter always; merged/, never from 4-bit weights, checked against the model as trained),
    summary.json, loss.png, W&B, and the Hub. Under FSDP every process takes part in gathering the model."""
    cfg, run_dir = s.cfg, s.run_dir
    rows = check_rows(s.splits)
    if "ref" in getattr(trainer.model, "peft_config", {}):  # TRL's frozen copy of init_from's adapter, the DPO
        trainer.model.delete_adapter("ref")                 # reference: not part of what the run made
    gathered = distributed.gather_for_export(s.world, trainer, cfg, s.tokenizer, rows)
    if not s.world.is_main:
        return summary
    rejected, export_start = None, time.time()
    reset_peak_memory(s.device.type)
    try:
        export_artifacts(s.run, run_dir, distributed.model_to_export(s.world, trainer), s.tokenizer, rows, summary,
                         f"python -m finetune export run={run_dir}", **gathered)
    except MergeRejected as e:  # the run and its adapter are kept; the user is told at the end
        rejected = e
    # GPU memory the export itself needed (the merge runs in CPU memory), or the process's peak RSS on CPU
    summary.update(export_runtime_s=time.time() - export_start, export_peak_memory_gb=peak_memory_gb(s.device.type))
    s.run.write_summary(summary, replace=True)
    plot_loss(s.metrics.read(), run_dir / "loss.png", f"{cfg.recipe}: {cfg.model.name_or_path.split('/')[-1]}")
    if cfg.tracking.log_model:
        log_model(s.wandb_run, run_dir / ("adapter" if cfg.lora.enabled else "model"), cfg.recipe, summary)
    finish_wandb(s.wandb_run, summary)
    if rejected is not None:
        raise rejected
    if cfg.hub.push:
        summary["hub_commit_url"] = publish_trained(s.run)
        s.run.write_summary({"hub_commit_url": summary["hub_commit_url"]})
    return summary


def publish_trained(run: Run) -> str:
    """hub.push=true: the finished run to the Hub; a failure keeps the run and says how to publish it later."""
    from finetune.publish import publish

    try:
        return publish(run)
    except UserError as e:
        raise UserError(f"{e} The run in {run.dir} is complete; publish it later with: python -m finetune "
                        f"publish run={run.dir} hub.repo_id={run.cfg.hub.repo_id}") from None


def reset_peak_memory(device_type: str) -> None:
    if device_type == "cuda":
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
        # bitsandbytes pages state through CUDA unified memory only; on a CPU it falls back to unpaged
        on_cuda = any(p.is_cuda for group in inner.param_groups for p in group["params"])
        desc["is_paged"] = bool(getattr(inner, "is_paged", False)) and on_cuda
    return desc


def count_quantized_layers(model) -> dict:
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
