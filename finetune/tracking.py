"""Run tracking: W&B (online / offline / disabled), and, whatever the tracker, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Optional

from finetune.config import TrackingConfig
from finetune.run import write_whole


def start_wandb(cfg: TrackingConfig, run_dir: Path, config: dict):
    """Start the W&B run (the Trainer's W&B callback then logs into it); None when tracking is off. A resumed run
    continues the W&B run it started (its id is kept in run_dir/wandb/)."""
    if cfg.backend != "wandb":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or cfg.mode  # the environment wins, so CI can force offline
    if mode != cfg.mode:
        logging.getLogger("finetune").info("W&B mode %s from WANDB_MODE (tracking.mode=%s is overridden)", mode, cfg.mode)
    wandb.setup(settings=wandb.Settings(silent=True))  # its banner, its offline warnings, its history table
    id_file = run_dir / "wandb" / "finetune_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    write_whole(id_file, lambda tmp: tmp.write_text(run_id + "\n"))
    run = wandb.init(
        id=run_id,
        resume="allow",
        settings=wandb.Settings(silent=True),  # where the run is: said below
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_dir.name,
        group=cfg.group,
        tags=list(cfg.tags) or None,
        mode=mode,
        dir=str(run_dir),
        # Nested: the Trainer's callback adds its TrainingArguments at the top level (output_dir, seed, ...).
        config={"finetune": config},
    )
    where = run.url if not run.offline else f"{run.dir} (offline; upload it with: wandb sync {Path(run.dir).parent})"
    logging.getLogger("finetune").info("W&B run %s: %s", run.id, where)
    return run


def wandb_link(run) -> dict:
    """Where the W&B run lives: its URL (null for an offline run until it is synced) and entity/project/id."""
    if run is None:
        return {"wandb_url": None, "wandb_run": None}
    path = "/".join(p for p in (run.entity, run.project, run.id) if p)
    return {"wandb_url": run.url if not run.offline else None, "wandb_run": path}


def log_model(run, adapter_dir: Path, recipe: str, summary: dict) -> None:
    """The adapter (or a full fine-tune's model/) as a W&B model artifact (type model, alias latest), with the
    run's key figures as metadata."""
    import wandb

    artifact = wandb.Artifact(
        name=f"{run.name or run.id}-{adapter_dir.name}".replace("/", "-"), type="model",
        description=f"{'LoRA adapter' if adapter_dir.name == 'adapter' else 'model'} of finetune recipe {recipe}",
        metadata={k: summary.get(k) for k in ("recipe", "base_model", "quantization", "eval_loss_base", "eval_loss",
                                               "trainable_params", "merge_base", "merge_mean_kl")},
    )
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact, aliases=["latest"])


def finish_wandb(run, summary: dict) -> None:
    if run is None:
        return
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
    run.finish()


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Resume from the checkpoint of `step`: the records of later steps are redone, so they go (a line cut
        short by a kill goes too)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_whole(self.path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))


def plot_loss(records: list[dict], png: Path, title: str) -> None:
    """loss.png: training loss per step, and eval loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.91)  # fixed margins: tight_layout costs 0.07 s a run
    write_whole(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def peak_memory_gb(device_type: str) -> Optional[float]:
    """Peak GPU memory allocated by PyTorch, or on CPU the process's peak resident memory."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def peak_memory_reserved_gb(device_type: str) -> Optional[float]:
    """Peak GPU memory reserved by PyTorch's caching allocator (what `plan` predicts); None on CPU."""
    if device_type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_reserved() / 1e9
