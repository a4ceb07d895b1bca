"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""

from __future__ import annotations

import difflib
import errno
import os
import re
from typing import Iterable, Optional


class UserError(Exception):
    """A problem the user caused and can fix: bad config, bad data, missing file, wrong device.

    The message says what is wrong, where, and how to fix it. The CLI prints it without a traceback.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


# The writes that fail for a reason the user can fix: a full disk or quota, a read-only or forbidden folder.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_error(e: BaseException) -> Optional[str]:
    """Why a write failed, where it is one of WRITE_ERRNOS, as an OSError or as safetensors' own error type
    (which carries only the OS error's text); None for any other exception."""
    code = e.errno if isinstance(e, OSError) else None
    if type(e).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code in WRITE_ERRNOS else None


# Names users bring from transformers / TRL / other toolkits, and ours for the same thing.
ALIASES = {
    "lr": "train.learning_rate",
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "load_in_4bit": "quant=nf4",
    "load_in_8bit": "quant=int8",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "model_name_or_path": "model.name_or_path",
    "dataset_name": "data.path",
}


def closest(word: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the nearest option, or '' when nothing is near."""
    options = list(options)
    alias = ALIASES.get(word.rsplit(".", 1)[-1])
    if alias:
        return f" Did you mean '{alias}'?"
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if not match:  # a key typed without its group: 'lr' for 'train.learning_rate' stays unmatched, 'r' finds 'lora.r'
        tail = word.rsplit(".", 1)[-1]
        match = [o for o in options if o.rsplit(".", 1)[-1] == tail][:1]
    return f" Did you mean '{match[0]}'?" if match else ""


class Preempted(Exception):
    """Training was stopped by a signal after writing a checkpoint; `resume=true` continues it."""

    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, signal_name: str, step: int, checkpoint: str, run_dir: str):
        super().__init__(f"{signal_name} at step {step}")
        self.signal_name, self.step, self.checkpoint, self.run_dir = signal_name, step, checkpoint, run_dir


class ReportedByMain(Exception):
    """In a multi-process run, an error the main process found and reports: the others exit quietly with it."""

    exit_code = 2
