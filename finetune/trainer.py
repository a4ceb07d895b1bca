"""Our schema -> trl.SFTConfig and SFTTrainer (checkpoints written atomically), and its three callbacks:
MetricsCallback (metrics.jsonl), PreemptionGuard (SIGTERM/Ctrl-C stop at a checkpoint) and NonFiniteGuard
(a NaN/inf gradient skips its update)."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from finetune.config import DataConfig, TrainConfig
from finetune.errors import write_error
from finetune.model import Device
from finetune.checkpoints import last_good_checkpoint, list_checkpoints
from finetune.tracking import MetricsLog, peak_memory_gb

log = logging.getLogger("finetune")


def packing_efficiency(dataset, max_length: int) -> float:
    """Share of the packed sequences' token slots that hold real tokens."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(lengths) / (len(lengths) * max_length) if lengths else 0.0


CONCATENATION_MAX_KL = 0.01  # bf16 kernels on other shapes stay far below; a leak across rows gives KL of order 1


def concatenation_error(model, rows: list[list[int]]) -> float:
    """The largest KL divergence, over every position of `rows`, between the model's next-token distributions with
    the rows padded into a batch and concatenated into one padding-free sequence (TRL's collator: position ids restart
    at each row). Near 0 where attention keeps the rows apart; of order 1 where state crosses from one row to the
    next (linear-attention layers, a model whose mask ignores the position ids)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": r} for r in rows]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    device, training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.no_grad():
            a = model(input_ids=padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device),
                      use_cache=False).logits.float().log_softmax(-1)
            b = model(input_ids=free["input_ids"].to(device), position_ids=free["position_ids"].to(device),
                      use_cache=False).logits.float().log_softmax(-1)
    finally:
        model.train(training)
    b = b[0].split([len(r) for r in rows])
    return max((a[i, :len(r)].exp() * (a[i, :len(r)] - b[i])).sum(-1).max().item() for i, r in enumerate(rows))


# Model families whose Liger kernels were measured to help with the same losses (scripts/bench_results/h200.md:
# Llama-2-7B QLoRA on an H200, 1.7% more tokens/s, 13% less peak memory, losses equal to 1e-3)
LIGER_MEASURED = ("llama",)


def settle_liger(train: TrainConfig, device_type: str, model) -> None:
    """Decide train.liger_kernel=null: on for a measured family on a CUDA GPU with liger-kernel installed."""
    if train.objective != "sft":  # TRL's DPO and ORPO compute their log-probabilities themselves (DPO: its fused head)
        train.liger_kernel = False
    if train.liger_kernel is not None:
        return
    installed = importlib.util.find_spec("liger_kernel") is not None
    train.liger_kernel = device_type == "cuda" and installed and model.config.model_type in LIGER_MEASURED
    if train.liger_kernel:
        log.info("Liger's kernels on (train.liger_kernel=null): measured to help %s models with the same losses",
                 model.config.model_type)


def settle_padding_free(data: DataConfig, model, dataset, sharded: bool) -> Optional[float]:
    """Decide data.padding_free=null, and refuse packing or padding-free where they change the math: both concatenate
    rows, which is exact only where attention keeps them apart. Checked on the model itself (concatenation_error,
    three rows of the training data, up to 16 tokens each). Under FSDP the model is not whole yet: null means off.
    Returns the KL measured (None: not checked)."""
    from finetune.errors import UserError

    if not data.packing and data.padding_free is False:
        return None
    if sharded:
        if data.padding_free is None:
            data.padding_free = False
        return None
    rows = [list(ids[:n]) for ids, n in zip(dataset["input_ids"][:3], (16, 11, 6))]
    kl = concatenation_error(model, rows)
    exact = kl < CONCATENATION_MAX_KL
    if not exact and (data.packing or data.padding_free):
        key = "data.packing=true" if data.packing else "data.padding_free=true"
        raise UserError(f"{key}: this model's next-token distributions change when rows are concatenated (KL {kl:.3g} "
                        f"against padded rows): its layers carry state from one row to the next (linear attention), "
                        f"or its attention ignores the position ids that keep rows apart. Set {key.split('=')[0]}=false.")
    if data.padding_free is None:
        data.padding_free = exact and not data.packing
        if exact:
            log.info("padding-free batches %s: this model's logits are the same padded and concatenated (KL %.2g)",
                     "(of packed sequences)" if data.packing else "on", kl)
        else:
            log.info("padding-free batches off: this model's logits change when rows are concatenated (KL %.2g)", kl)
    return kl


def version_dependent_args(sft_config, train: TrainConfig) -> dict:
    """Checkpointing and the KV cache, under the names this transformers version knows."""
    fields = sft_config.__dataclass_fields__
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing; older versions know only the first.
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = {name: train.gradient_checkpointing,
            f"{name}_kwargs": {"use_reentrant": False} if train.gradient_checkpointing else None}
    # No KV cache in training: transformers only builds per-row attention from packed position ids when no
    # cache exists, so a cache would let packed rows attend to each other (the Trainer's default, made explicit).
    if "use_cache" in fields:
        args["use_cache"] = False
    return args


def trainer_args(train: TrainConfig, data: DataConfig, device: Device, checkpoints: Path, report_to: str,
                 run_name: str, has_eval: bool, eval_on_start: bool, config_class) -> dict:
    """What every objective's Trainer takes from our schema: schedule, batch, precision, logging and checkpoints."""
    return dict(
        **version_dependent_args(config_class, train),
        output_dir=str(checkpoints),
        run_name=run_name,
        report_to=report_to,
        seed=train.seed,
        data_seed=train.seed,
        # Schedule and batch
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim="adamw_torch" if train.optim == "adamw_kahan" else train.optim,  # (the class comes from optimizer_of)
        # Memory and precision
        bf16=device.precision == "bf16",
        fp16=device.precision == "fp16",
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=device.type == "cuda",
        # Logging, evaluation, checkpoints
        logging_steps=train.logging_steps,
        logging_first_step=True,
        disable_tqdm=True,  # ProgressLine says where training is, one line per log
        eval_strategy="steps" if train.eval_steps and has_eval else "no",
        eval_on_start=eval_on_start,  # the base's eval loss, once the model is ready (FSDP: sharded)
        eval_steps=train.eval_steps or None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        torch_compile=train.compile,
        ddp_find_unused_parameters=False,  # every LoRA (or full) weight is used in each step: no extra graph walk
        dataset_num_proc=data.num_proc,
    )


def build_sft_config(train: TrainConfig, data: DataConfig, device: Device, checkpoints: Path,
                     report_to: str, run_name: str, eos_token: Optional[str] = None, has_eval: bool = True,
                     eval_on_start: bool = False, keep_columns: bool = False):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_args(train, data, device, checkpoints, report_to, run_name, has_eval, eval_on_start, SFTConfig),
        use_liger_kernel=train.liger_kernel,
        activation_offloading=train.activation_offloading,  # TRL's: saved tensors to pinned CPU memory, on streams
        remove_unused_columns=not keep_columns,  # distillation: the teacher's columns reach our collator
        # Data arrives tokenized, with labels (finetune/data/tokenize.py): TRL truncates to max_length and,
        # with packing, packs best-fit and trains padding-free (position ids keep the rows apart).
        # Padding-free without packing: TRL leaves truncation to us, and our tokenization already applied
        # data.too_long, so every row is within data.max_length.
        max_length=None if data.padding_free and not data.packing else data.max_length,
        packing=data.packing,
        packing_strategy="bfd",
        padding_free=bool(data.padding_free),  # null until settle_padding_free decides; (bfd packing is padding-free anyway)
        # The chat template's end-of-turn token: TRL adds it to the model's generation config, so it stops there.
        eos_token=eos_token,
    )


def build_dpo_config(train: TrainConfig, data: DataConfig, device: Device, checkpoints: Path, report_to: str,
                     run_name: str, has_eval: bool = True, eval_on_start: bool = False, reference_pass: bool = False):
    """train.objective=dpo: TRL's DPOConfig, the sigmoid loss at train.beta. The pairs arrive tokenized
    (finetune/data/pairs.py) and within data.max_length (data.too_long); TRL's collator cuts at max_length
    (data.too_long=truncate), keeping the prompt and the answers' start. The reference is the model with its
    adapter off (LoRA), or, training every weight (reference_pass), the model's log-probabilities computed once
    before the first step: never a second model in memory."""
    from trl import DPOConfig

    return DPOConfig(
        **trainer_args(train, data, device, checkpoints, report_to, run_name, has_eval, eval_on_start, DPOConfig),
        activation_offloading=train.activation_offloading,
        beta=train.beta,
        loss_type=["sigmoid", "sft"] if train.sft_weight else ["sigmoid"],
        loss_weights=[1.0, train.sft_weight] if train.sft_weight else None,
        max_length=data.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=reference_pass,
    )


def build_orpo_config(train: TrainConfig, data: DataConfig, device: Device, checkpoints: Path, report_to: str,
                      run_name: str, has_eval: bool = True, eval_on_start: bool = False):
    """train.objective=orpo: TRL's ORPOConfig (trl.experimental.orpo), its odds-ratio term weighted by train.beta
    (ORPO's lambda) beside the chosen answers' cross-entropy. No reference model at all. The pairs arrive tokenized
    and within data.max_length, as for DPO."""
    config_class = orpo_classes()[0]
    return config_class(
        **trainer_args(train, data, device, checkpoints, report_to, run_name, has_eval, eval_on_start, config_class),
        beta=train.beta,
        max_length=data.max_length,
        remove_unused_columns=False,  # (its collator reads its own columns; it would set this itself, with a warning)
    )


def orpo_classes() -> tuple:
    """(ORPOConfig, ORPOTrainer): TRL keeps ORPO under trl.experimental, whose import warns that its API may change
    (tests/unit/test_internals.py fails the day what we use of it does)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def checkpoint_mixin():
    """What our trainers add to TRL's, whatever the objective: checkpoints written atomically and resumes that keep
    the adapter's dtype. (Its overrides are of the Trainer's private methods: tests/unit/test_internals.py fails the
    day they move.)"""

    class Checkpoints:
        _staging: Optional[str] = None

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            write = super()._save_checkpoint
            save_atomically(self, super()._get_output_dir(trial), lambda: write(model, trial))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """Loading the adapters back re-creates them in PEFT's default fp32, but TRL trains a quantized model's
            adapter in bf16 (and DPO's frozen reference copy is computed as it: match_reference_dtype): restore the
            dtypes they had, or the resumed run computes something else."""
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad or ".ref." in n}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in target.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

    return Checkpoints


def trainer_class(objective: str = "sft"):
    """The trainer of train.objective: TRL's SFTTrainer, DPOTrainer or ORPOTrainer, with checkpoint_mixin()'s
    checkpoints. DPO and ORPO take the pairs as finetune.data.pairs tokenized them (masks from the chat template,
    checked and cached) instead of tokenizing them again."""
    return {"sft": sft_trainer, "dpo": dpo_trainer, "orpo": orpo_trainer}[objective]()


def sft_trainer():
    """SFT; with `distill` set (a DistillConfig), its training loss is the distillation loss on the teacher's stored
    top-k."""
    from trl import SFTTrainer

    class Trainer(checkpoint_mixin(), SFTTrainer):
        distill = None  # finetune.config.DistillConfig: distil (set by build_trainer)
        _parts: Optional[dict] = None  # the distillation loss's two terms since the last log

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.distill is None or "teacher_ids" not in inputs:  # SFT, and eval (its loss: cross-entropy)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            tokens = inputs["attention_mask"].sum().item() if "attention_mask" in inputs else inputs["position_ids"].size(1)
            loss, outputs, parts = distillation_loss(model, inputs, self.distill)
            self._parts = {k: (self._parts or {}).get(k, 0.0) + v for k, v in parts.items()}
            self._total_train_tokens += tokens  # as TRL's own loss counts them (tokens/s, summary.json)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._parts and "loss" in logs:  # the mean of each term over the steps this log covers
                n = self._parts.pop("n")
                logs |= {k: v / n for k, v in self._parts.items()}
                self._parts = None
            return super().log(logs, *args, **kwargs)

    return Trainer


def dpo_trainer():
    """DPO, its reference copy of a continued adapter computed as the adapter is (match_reference_dtype)."""
    from trl import DPOTrainer

    class PreferenceTrainer(checkpoint_mixin(), DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            match_reference_dtype(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreferenceTrainer


def orpo_trainer():
    """ORPO, its cross-entropy over the chosen answers only, counting the tokens it trains on."""
    class OddsRatioTrainer(checkpoint_mixin(), orpo_classes()[1]):
        def tokenize_row(self, feature, model=None):
            return orpo_row(feature)

        def concatenated_forward(self, model, batch):
            """TRL's, with the cross-entropy over the chosen answers only: TRL's own also trains the prompt's
            tokens, where SFT (and the ORPO paper) trains the reply."""
            import torch.nn.functional as F

            out = super().concatenated_forward(model, batch)
            logits, labels = out[2], batch["chosen_labels"][:, 1:].to(out[2].device)  # logits: [:, :-1]
            labels = F.pad(labels, (0, logits.shape[1] - labels.shape[1]), value=-100)
            return (*out[:4], F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), *out[5:])

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # TRL's ORPO counts no tokens: both sides' non-padding ones, as DPO counts them
                tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
                self._total_train_tokens = getattr(self, "_total_train_tokens", 0) + int(
                    self.accelerator.gather_for_metrics(tokens.reshape(1)).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs["num_tokens"] = float(getattr(self, "_total_train_tokens", 0))
            return super().log(logs, *args, **kwargs)

    return OddsRatioTrainer


def orpo_row(pair: dict) -> dict:
    """A pair as finetune.data.pairs tokenized it, in the columns TRL's ORPO collator pads: each side the prompt and
    its answer, labelled on the answer only."""
    prompt, row = list(pair["prompt_ids"]), {"prompt_input_ids": list(pair["prompt_ids"]),
                                              "prompt_attention_mask": [1] * len(pair["prompt_ids"])}
    for side in ("chosen", "rejected"):
        answer = list(pair[f"{side}_ids"])
        row |= {f"{side}_input_ids": prompt + answer, f"{side}_attention_mask": [1] * (len(prompt) + len(answer)),
                f"{side}_labels": [-100] * len(prompt) + answer}
    return row


def match_reference_dtype(model) -> None:
    """TRL's DPO on a quantized base casts the trained adapter to bf16 after copying it as the reference adapter
    ("ref", for a run that starts from an adapter), which stays in fp32: the same values (they came from the same
    file), computed at another precision, so the reference was not the policy at step 0 (a loss of 0.6928 instead of
    log 2). The copy takes the trained adapter's dtype, as the exact copy it is meant to be."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        twin = params.get(name.replace(".ref.", ".default."))
        if ".ref." in name and twin is not None and p.dtype != twin.dtype:
            p.data = p.data.to(twin.dtype)


def distillation_loss(model, inputs: dict, distill) -> tuple:
    """alpha x distill_loss + (1 - alpha) x cross-entropy over the batch's trained tokens, whose teacher top-k the
    collator (TeacherCollator) laid out in the same order: row by row, position by position. The student's logits are
    computed whole here (TRL's fused head gives a loss, not logits). Returns (loss, outputs, the terms for the log)."""
    import torch.nn.functional as F

    from finetune.distill import distill_loss

    ids, logprobs = inputs.pop("teacher_ids"), inputs.pop("teacher_logprobs")
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    targets = labels[:, 1:]
    trained = targets != -100
    logits = outputs.logits[:, :-1][trained]
    if logits.shape[0] != ids.shape[0]:
        raise RuntimeError(f"{logits.shape[0]} trained tokens in the batch, {ids.shape[0]} rows of the teacher's top-k")
    ce = F.cross_entropy(logits.float(), targets[trained])
    kl = distill_loss(logits, ids, logprobs, distill.loss, distill.temperature)
    loss = distill.alpha * kl + (1 - distill.alpha) * ce
    return loss, outputs, {"distill_divergence": kl.item(), "distill_cross_entropy": ce.item(), "n": 1}


class TeacherCollator:
    """TRL's collator, with each row's teacher top-k taken out first and put back after, concatenated in row order
    (every row has a trained token: finetune.data.tokenize refuses one without)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if "teacher_ids" not in features[0]:  # eval rows: no teacher
            return self.inner(features)
        ids = torch.cat([torch.tensor(f.pop("teacher_ids"), dtype=torch.long) for f in features])
        logprobs = torch.cat([torch.tensor(f.pop("teacher_logprobs"), dtype=torch.float32) for f in features])
        return self.inner(features) | {"teacher_ids": ids, "teacher_logprobs": logprobs}


def save_atomically(trainer, root: str, write) -> None:
    """Let `write` (the Trainer's own checkpoint save) write checkpoint-N under checkpoints/.staging/, and rename it
    when complete: a run killed mid-write leaves the previous checkpoints as they were. A failed write is one clear
    error. With several processes, each writes its part (RNG state, FSDP shards) and the main process renames
    when all are done."""
    import os
    import shutil

    from finetune import distributed

    name, staging, main = f"checkpoint-{trainer.state.global_step}", os.path.join(root, ".staging"), trainer.args.should_save
    try:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        trainer._staging = staging
        write()
        distributed.barrier()
        if main:
            final = os.path.join(root, name)
            if os.path.isdir(final):  # the same step saved again (a resumed run): replace it
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as e:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        reason = write_error(e)
        if reason is None:
            raise
        raise checkpoint_write_failed(name, root, reason) from None
    finally:
        trainer._staging = None
    if main:
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=root, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)


def checkpoint_write_failed(name: str, root: str, reason: str):
    from finetune.errors import UserError

    kept = [p.name for p in list_checkpoints(Path(root))]
    return UserError(f"Could not write {name} to {root} ({reason}). "
                     + (f"The previous checkpoint, {kept[-1]}, is intact: free space or fix the folder's permissions, "
                        "then resume with resume=true." if kept else
                        "No checkpoint was written yet: free space or fix the folder's permissions, then run the "
                        "same command again (it starts over)."))


def unmark_prepared(trainer) -> None:
    """Let the Trainer wrap the model for training after an evaluation.

    trainer.evaluate() before training prepares the bare model for evaluation, and accelerate (1.14+) marks it
    prepared; its training prepare then skips the model, so DDP never wraps it and every process trains its own
    copy, without a gradient all-reduce. Clearing the mark restores the wrap (found on accelerate 1.15)."""
    for model in (trainer.model, trainer.model_wrapped):
        if getattr(model, "_is_accelerate_prepared", False):
            model._is_accelerate_prepared = False


def optimizer_of(train: TrainConfig, args) -> Optional[tuple]:
    """train.optim=adamw_kahan: torch-optimi's AdamW (the library transformers' own stable_adamw comes from), with
    the Trainer's hyperparameters and PyTorch's AdamW defaults. It keeps a Kahan-summation buffer beside every 16-bit
    weight (kahan_sum=None: for low-precision parameters only), so updates below a weight's bf16 spacing add up
    instead of rounding away. None: the Trainer builds train.optim by its name."""
    if train.optim != "adamw_kahan":
        return None
    from optimi import AdamW

    return AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                   "weight_decay": args.weight_decay, "kahan_sum": None}


def build_trainer(model, tokenizer, train_dataset, eval_dataset, peft_config, args, callbacks, optimizer=None,
                  distill=None, objective: str = "sft"):
    """The trainer of `objective`, printing one progress line per log (ProgressLine) instead of its dicts
    (PrinterCallback, which it adds when its bars are off); `optimizer`: optimizer_of()'s (class, kwargs), or None;
    `distill`: the DistillConfig when train_dataset carries the teacher's top-k (finetune.distill.teach);
    `peft_config` None with a PeftModel: its adapter is trained on (init_from)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's passes over rows we tokenized and checked: quick, and said by us
    try:
        trainer = trainer_class(objective)(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[*callbacks, ProgressLine()],
        )
    finally:
        if shown:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)
    trainer.optimizer_cls_and_kwargs = optimizer  # (read when the optimizer is made; DPOTrainer has no such argument)
    if distill is not None:
        trainer.distill, trainer.data_collator = distill, TeacherCollator(trainer.data_collator)
        trainer.model_accepts_loss_kwargs = False  # a mean per micro-batch: the Trainer divides by the accumulation
    return trainer


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, lr, grad_norm, eval loss) to metrics.jsonl, with tokens/s and memory."""

    def __init__(self, log: MetricsLog, device_type: str):
        self.log = log
        self.device_type = device_type
        self._last: Optional[tuple[float, float]] = None  # (time, tokens seen) at the previous log
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), 0.0)
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})  # the Trainer has averaged losses over the processes: rank 0 writes them
        if "train_runtime" in logs or not state.is_world_process_zero:  # the end-of-training summary, written to summary.json instead
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
        if self._last is not None and "num_tokens" in logs and now > self._last[0]:
            record["tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
            record["step_time_s"] = (now - self._last[0]) / max(1, state.global_step - self._last_step)
            self._last = (now, tokens)
            self._last_step = state.global_step
        record["memory_gb"] = peak_memory_gb(self.device_type)
        self.log.append(record)


class RunTotals(TrainerCallback, ExportableState):
    """Tokens trained and seconds spent training over the whole run, across resumes. The Trainer saves what
    state() returns in each checkpoint's trainer_state.json; a resumed run starts from the checkpoint's totals
    (resumed()), and this segment adds TRL's own count of its non-padding tokens and its runtime."""

    def __init__(self, tokens: int = 0, seconds: float = 0.0):
        self.tokens_before, self.seconds_before = tokens, seconds
        self.trainer, self._start = None, None

    @classmethod
    def resumed(cls, checkpoint: Optional[str]) -> "RunTotals":
        import json

        if checkpoint is None:
            return cls()
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks", {})
        args = saved.get(cls.__name__, {}).get("args", {})
        return cls(int(args.get("tokens", 0)), float(args.get("seconds", 0.0)))

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def tokens(self) -> int:
        return self.tokens_before + int(getattr(self.trainer, "_total_train_tokens", 0))

    def state(self) -> dict:
        seconds = self.seconds_before + (time.perf_counter() - self._start if self._start else 0.0)
        return {"args": {"tokens": self.tokens(), "seconds": seconds}, "attributes": {}}


class ProgressLine(TrainerCallback):
    """One line per logged step on stderr, instead of the Trainer's raw dicts and bars: the step, loss, learning
    rate, speed and time left; and each evaluation's loss."""

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._first = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero:
            return
        if "loss" in logs:
            done, elapsed = state.global_step - self._first, time.perf_counter() - self._start
            left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            log.info(
                "step %d/%d  loss %.4g  lr %.3g  %.3g s/step  %s left", state.global_step, state.max_steps,
                logs["loss"], logs.get("learning_rate", 0.0), elapsed / max(done, 1), clock(left))
        elif "eval_loss" in logs:
            log.info("eval at step %d: loss %.4g", state.global_step, logs["eval_loss"])


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class PreemptionGuard(TrainerCallback):
    """SIGTERM (a spot instance, a scheduler) or SIGINT (Ctrl-C) during training: finish the current step,
    write a checkpoint, stop. A second signal acts as usual (Ctrl-C twice stops at once)."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        import signal

        self.signal = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        from finetune import distributed

        # A signal to one process stops them all at the same step: the others would wait in the next collective.
        if distributed.any_process(self.signal is not None):
            self.signal = self.signal or "a signal to another process"
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()


class NonFiniteGuard(TrainerCallback):
    """A NaN or inf gradient (from a NaN or inf loss, or an overflow) skips that optimizer step; after
    train.max_bad_steps of them the run stops with the step and the last good checkpoint, which is kept."""

    def __init__(self, max_bad_steps: int, checkpoints: Path):
        self.max_bad_steps, self.checkpoints = max_bad_steps, checkpoints
        self.bad_steps: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        from finetune import distributed

        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        bad = bool(grads) and not all(torch.isfinite(g).all() for g in grads)
        # Under FSDP each process sees its shard of the gradients: a step is skipped by all or by none.
        if not distributed.any_process(bad):
            return
        step = state.global_step + 1
        self.bad_steps.append(step)
        for p in model.parameters():  # the optimizer skips parameters without a gradient: no update at all
            p.grad = None
        if len(self.bad_steps) > self.max_bad_steps:
            from finetune.errors import UserError

            last = last_good_checkpoint(self.checkpoints) if self.checkpoints.is_dir() else None
            raise UserError(
                f"Non-finite loss or gradient at step {step} ({len(self.bad_steps)} such step(s); "
                f"train.max_bad_steps={self.max_bad_steps}). "
                + (f"The last good checkpoint, {Path(last).name}, is kept: lower train.learning_rate or check the "
                   "data, then continue it with resume=true" if last else "No checkpoint was written yet: lower "
                   "train.learning_rate or check the data")
                + ", or allow a few bad steps with train.max_bad_steps=N.")
        logging.getLogger("finetune").warning("Step %d: non-finite loss or gradient; the update was skipped (%d of "
                                              "train.max_bad_steps=%d).", step, len(self.bad_steps), self.max_bad_steps)
