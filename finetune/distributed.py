"""Several processes, one run: what `accelerate launch` (DDP or FSDP) needs from the pipeline.

accelerate starts one process per GPU and the Trainer does the data parallelism. What is ours: every
process agrees on one run directory (rank 0's), only the main process writes files, the W&B run, exports
and Hub uploads, data is tokenized once (rank 0 first, the others read datasets' cache), each process
loads its quantized base on its own GPU, and decisions taken in one process (a signal, a non-finite
gradient) are taken by all, or the others would wait forever in the next collective.

A single `python -m finetune` is a world of one process: every helper here is then a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class World:
    size: int         # processes (GPUs) in the run
    rank: int         # this process's index, 0 = main
    local_rank: int   # its index on this machine: its GPU
    strategy: str     # "single", "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """FSDP: each process holds a shard of the model, whole only inside the Trainer's forward."""
        return self.strategy == "fsdp"


def world() -> World:
    """This process's place in the launch, from the variables torchrun / accelerate set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    # FSDP even on one GPU (accelerate wraps the model all the same): the path can be checked on one card
    strategy = "fsdp" if _flag("ACCELERATE_USE_FSDP") else ("single" if size == 1 else "ddp")
    return World(size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), strategy)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def init(cpu: bool) -> World:
    """Join the process group (gloo on CPU, NCCL on GPUs) the Trainer will use; nothing for one process."""
    w = world()
    if w.distributed or w.sharded:
        from accelerate import PartialState

        PartialState(cpu=cpu)  # the Trainer's TrainingArguments re-uses this group
        if not w.is_main:
            quiet_replica()
        logging.getLogger("finetune").info("accelerate launch: %d processes (%s)", w.size, w.strategy.upper())
    return w


def check_launch(cfg, w: World, device_type: str) -> None:
    """What the launch (`accelerate launch` and its config) cannot do with this recipe on this machine."""
    from finetune.errors import UserError

    if w.sharded and device_type != "cuda":
        raise UserError("An FSDP config (configs/accelerate/fsdp*.yaml) needs CUDA GPUs: without them accelerate would "
                        "quietly run data parallel instead. On CPUs use --config_file configs/accelerate/ddp.yaml.")
    if w.sharded and cfg.quant.method == "int8":
        raise UserError("quant=int8 cannot be sharded by FSDP (LLM.int8 weights are integers, FSDP shards floating-point "
                        "tensors): use quant=nf4 with configs/accelerate/fsdp_qlora.yaml, or keep int8 under "
                        "configs/accelerate/ddp.yaml.")
    if w.distributed and cfg.distill.teacher:
        raise UserError("distill.teacher: distillation runs in one process (the teacher's pass is stored once, then "
                        "the student trains): python -m finetune distill teacher=... without accelerate launch.")
    if w.sharded and cfg.train.objective == "dpo" and not cfg.lora.enabled:
        raise UserError("train.objective=dpo with lora.enabled=false under FSDP has no room for its reference: TRL "
                        "loads a second, unsharded copy of the whole model in every process to compute the reference "
                        "log-probabilities before training. Train a LoRA adapter (the reference is then the adapter "
                        "off, in the same weights), or launch with configs/accelerate/ddp.yaml (or in one process), "
                        "where they are computed by the model itself before its first step.")
    if w.sharded and os.environ.get("FSDP_VERSION") == "2" and cfg.train.optim in BITSANDBYTES_OPTIMIZERS:
        raise UserError(f"train.optim={cfg.train.optim} is a bitsandbytes optimizer, and its update kernels cannot take "
                        "FSDP2's sharded (DTensor) parameters (configs/accelerate/fsdp.yaml): set train.optim=adamw_torch "
                        "(LoRA's optimizer states are small), or use configs/accelerate/fsdp_qlora.yaml (FSDP1), where "
                        "8-bit AdamW works.")


BITSANDBYTES_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")


def quiet_replica() -> None:
    """The other processes run the same code as rank 0: their logs, warnings and progress bars would only
    repeat rank 0's. They still print errors."""
    import warnings

    import datasets
    import transformers

    logging.getLogger("finetune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def joined() -> bool:
    """Whether this process has joined the others (the process group is up): errors before that are the same
    in every process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast(obj):
    """rank 0's value of obj, in every process."""
    if not joined():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn):
    """fn() in the main process only; its result, or its UserError, in every process. The main process
    raises the error with its message; the others raise ReportedByMain, so it is printed once."""
    if not joined():
        return fn()
    from finetune.errors import ReportedByMain, UserError

    outcome = None
    if world().is_main:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", e)
    outcome = broadcast(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    if world().is_main:
        raise outcome[1]
    raise ReportedByMain()


def barrier() -> None:
    if joined():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (filling datasets' cache), then the others (reading it)."""
    if not joined():
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def any_process(flag: bool) -> bool:
    """True in every process if it is true in any: one process's decision, taken by all."""
    if not joined():
        return flag
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    t = torch.tensor([1.0 if flag else 0.0], device=PartialState().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(items: list) -> list:
    """Every process's list, concatenated in rank order, in every process."""
    if not joined():
        return items
    from accelerate.utils import gather_object

    return gather_object(items)



# ---- FSDP: the model is whole only inside the Trainer --------------------------------------------------

def base_eval_at_start(w: World, resuming: bool, has_eval: bool) -> bool:
    """Whether the Trainer measures the untouched base as training starts (eval_on_start): under FSDP the model is
    sharded only then, so the pipeline cannot measure it before."""
    return w.sharded and not resuming and has_eval


def base_eval_loss(trainer) -> Optional[float]:
    """The base's eval loss the Trainer logged at the start of training (eval_on_start)."""
    return next((r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r), None)


def model_to_export(w: World, trainer):
    """The trained model as export saves it (its weights come gathered, below): under FSDP every wrapper taken out,
    the decoder layers' too. PEFT picks the adapter's entries of the gathered state dict by the names of the modules
    it sees, and FSDP1's nested wrappers put `_fsdp_wrapped_module` in those names but not in the gathered keys:
    unwrapped at the top only, the adapter was saved empty (seen on an H200 with fsdp_qlora.yaml). This takes the
    wrappers out of the model in place; export is the last use of it."""
    if not w.sharded:
        return trainer.model
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(trainer.model, recursive=True)


def gather_for_export(w: World, trainer, cfg, tokenizer, rows) -> dict:
    """FSDP: the full state dict (on rank 0) and, for a merge, the logits of the model as trained on the check
    samples; every process takes part. Nothing to gather otherwise."""
    if not w.sharded:
        return {}
    from finetune.export import check_samples, logits_of

    out = {"state_dict": trainer.accelerator.get_state_dict(trainer.model)}
    if cfg.export.merge and cfg.lora.enabled:
        samples = check_samples(tokenizer, rows, cfg.export.check_samples, cfg.data)
        out["reference"] = logits_of(trainer.model, samples)
    return out
