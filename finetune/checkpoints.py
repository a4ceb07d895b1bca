"""Checkpoints: what the Trainer writes into checkpoints/, read back without unpickling anything. Which one a run
resumes from (the newest complete one, written by as many processes), and what a resumed run may change."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from finetune.errors import UserError

log = logging.getLogger("finetune")



def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoint-N folders in root, oldest (lowest N) first; none if root does not exist."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why this checkpoint cannot be resumed from (None: it is complete). Checkpoints are renamed into place
    only when complete, so a bad one is a disk or copy accident; every file resume needs is read."""
    problem = trainer_state_problem(path / "trainer_state.json")
    if problem:
        return problem
    sharded = [p for p in path.glob("pytorch_model_fsdp_*") if p.is_dir()]  # FSDP's SHARDED_STATE_DICT
    weights = [p for p in (path / "adapter_model.safetensors", path / "model.safetensors") if p.is_file()]
    if not weights and not sharded:
        return "no adapter_model.safetensors or model.safetensors"
    unreadable = weights and safetensors_problem(weights[0])
    if unreadable:
        return unreadable
    optimizer = [p for p in (path / "optimizer.pt", path / "optimizer.bin") if p.is_file() and p.stat().st_size]
    if not optimizer and not any(p.is_dir() for p in path.glob("optimizer_*")):  # optimizer_0/: FSDP, sharded
        return "no optimizer.pt"
    if not (path / "scheduler.pt").is_file() or (path / "scheduler.pt").stat().st_size == 0:
        return "no scheduler.pt"
    saved = [*optimizer, path / "scheduler.pt", *path.glob("rng_state*.pth"), *path.glob("scaler.pt")]
    return next(filter(None, map(torch_file_problem, saved)), None)


def trainer_state_problem(state: Path) -> Optional[str]:
    if not state.is_file():
        return "no trainer_state.json"
    try:
        values = json.loads(state.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON"
    if not (isinstance(values, dict) and isinstance(values.get("global_step"), int)
            and isinstance(values.get("log_history"), list)):
        return "trainer_state.json does not hold a trainer state (global_step, log_history)"
    return None


def torch_file_problem(file: Path) -> Optional[str]:
    """Why a file torch.save wrote cannot be read whole: it is a zip archive, each entry with its checksum, so a
    truncated or garbled one is found without unpickling anything."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{file.name} is unreadable ({type(e).__name__})"
    return f"{file.name} is damaged ({bad})" if bad else None


def safetensors_problem(file: Path, whole: bool = True) -> Optional[str]:
    """Why a safetensors file cannot be read (truncated or garbled: safetensors checks the header against the file
    size; `whole`: every tensor is read too), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys() if whole else ():
                f.get_tensor(key)
    except Exception as e:
        return f"{file.name} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


def checkpoint_processes(checkpoint) -> int:
    """How many processes wrote a Trainer checkpoint: each saves its RNG state (rng_state_N.pth), a single
    process rng_state.pth."""
    return len(list(Path(checkpoint).glob("rng_state_*.pth"))) or 1


def last_good_checkpoint(ckpts: Path) -> Optional[str]:
    """The newest complete checkpoint in ckpts; each newer one that is not is named in a warning."""
    for path in reversed(list_checkpoints(ckpts)):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log.warning("Skipping %s for resume: %s. Using an earlier checkpoint.", path.name, problem)
    return None


def resume_checkpoint(ckpts: Path, processes: int) -> str:
    """resume=true: the last good checkpoint, written by as many processes as this launch has."""
    resume_from = last_good_checkpoint(ckpts)
    if resume_from is None:
        raise UserError(f"resume=true but {ckpts} holds no checkpoint to resume from: drop resume=true to start a "
                        "new run.")
    wrote = checkpoint_processes(resume_from)
    if wrote != processes:  # the data order and each process's random state depend on the count
        raise UserError(f"{Path(resume_from).name} was written by {wrote} process(es) and this launch has "
                        f"{processes}: resume with the same number, "
                        + ("python -m finetune ... resume=true" if wrote == 1 else
                           f"accelerate launch --num_processes {wrote} ... -m finetune ... resume=true") + ".")
    return resume_from


def checkpoint_step(checkpoint) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


def finished(checkpoint, epochs: float, max_steps: int) -> bool:
    """The checkpoint is of the last step of the schedule the run still has (it stopped during its final eval or
    export): nothing is left to train, where the Trainer would take one step more before it checks."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    same = max_steps == state.get("max_steps") if max_steps > 0 else epochs == state.get("num_train_epochs")
    return same and state["global_step"] >= state.get("max_steps", float("inf"))


# ---- what a resumed run may change --------------------------------------------------------------

# How a resumed run is run, logged and saved, how long its schedule is and how large its steps: these may change,
# and the change is logged. Every other key of model, quant, lora, data and train decides the model, its adapter,
# the rows or their order: a checkpoint written under another value does not continue this run.
RESUMABLE = {
    "model.attn_implementation", "model.trust_remote_code", "model.allow_pickle", "model.hub_id",
    "data.num_proc", "data.bad_rows", "data.max_drop_fraction", "data.eval_max_samples",
    "train.epochs", "train.max_steps", "train.learning_rate", "train.warmup_ratio", "train.weight_decay",
    "train.max_grad_norm", "train.gradient_checkpointing", "train.liger_kernel", "train.compile",
    "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.eval_batch_size",
    "train.max_bad_steps", "train.auto_fit", "train.micro_batch_size", "train.grad_accum",  # their product may not
}
CHECKED = ("model.", "quant.", "lora.", "data.", "train.")
NOT_SETTINGS = {"recipe", "output_dir", "resume", "overwrite"}


def resume_changes(before, now) -> dict[str, tuple]:
    """{key: (before, now)} for the settings a resume changes, each logged as deliberate; a UserError naming those
    the checkpoints cannot carry (`before`: the run's config.yaml)."""
    from finetune.config import leaf_values

    old, new = leaf_values(before), leaf_values(now)
    changed = {k: (old[k], new[k]) for k in new if k not in NOT_SETTINGS and old[k] != new[k]}
    fixed = [f"{k}={v[1]} (the run has {v[0]})" for k, v in changed.items()
             if k.startswith(CHECKED) and k not in RESUMABLE]
    batch = [b.train.micro_batch_size * b.train.grad_accum for b in (before, now)]
    if batch[0] != batch[1]:
        fixed.append(f"an effective batch (train.micro_batch_size x train.grad_accum) of {batch[1]} (the run has "
                     f"{batch[0]}; their split may change, not their product)")
    if fixed:
        raise UserError(f"resume=true cannot continue the run with {'; '.join(fixed)}: its checkpoints were trained "
                        "otherwise. Resume with the run's own settings (its config.yaml), or start a new run with "
                        "another output_dir.")
    for key, (was, value) in changed.items():
        log.info("resume: %s=%s (was %s), a deliberate change", key, value, was)
    return changed
