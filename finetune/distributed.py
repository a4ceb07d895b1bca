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
import os
from dataclasses import dataclass


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


def world() -> World:
    """This process's place in the launch, from the variables torchrun / accelerate set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    # FSDP even on one GPU (accelerate wraps the model all the same): the path can be checked on one card
    strategy = "fsdp" if _flag("ACCELERATE_USE_FSDP") else ("single" if size == 1 else "ddp")
    return World(size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), strategy)


def fsdp_version() -> int:
    """FSDP1 or FSDP2, as the accelerate config asked (fsdp_version)."""
    return int(os.environ.get("FSDP_VERSION", "1"))


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


_joined = False


def joined() -> bool:
    """Whether this process has joined the others: errors before that are the same in every process."""
    return _joined


def init(cpu: bool) -> World:
    """Join the process group (gloo on CPU, NCCL on GPUs) the Trainer will use; nothing for one process."""
    global _joined
    w = world()
    if w.distributed or w.strategy == "fsdp":
        _joined = True
        from accelerate import PartialState

        PartialState(cpu=cpu)  # the Trainer's TrainingArguments re-uses this group
        if not w.is_main:
            quiet_replica()
    return w


def quiet_replica() -> None:
    """The other processes run the same code as rank 0: their logs, warnings and progress bars would only
    repeat rank 0's. They still print errors."""
    import logging
    import warnings

    import datasets
    import transformers

    logging.getLogger("finetune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast(obj):
    """rank 0's value of obj, in every process."""
    if not _initialized():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn):
    """fn() in the main process only; its result, or its UserError, in every process. The main process
    raises the error with its message; the others raise ReportedByMain, so it is printed once."""
    if not _initialized():
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
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (filling datasets' cache), then the others (reading it)."""
    if not _initialized():
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def any_process(flag: bool) -> bool:
    """True in every process if it is true in any: one process's decision, taken by all."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    t = torch.tensor([1.0 if flag else 0.0], device=PartialState().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(items: list) -> list:
    """Every process's list, concatenated in rank order, in every process."""
    if not _initialized():
        return items
    from accelerate.utils import gather_object

    return gather_object(items)

