"""A run directory, owned by one type: `Run`.

Everything that reads or writes a run directory goes through it: its paths, the check and creation of a new
one, its checkpoints, summary.json (one writer, which merges), the model cards of its exports, and loading
what it trained back for inference (`load_for_inference`). `export`, `eval`, `generate` and `publish`
take a Run; training creates one.

    config.yaml   summary.json   metrics.jsonl   loss.png
    checkpoints/checkpoint-N/     adapter/   merged/   model/ (a full fine-tune)
    exports/checkpoint-N/         (an export or eval of checkpoint N: adapter/, merged/, summary.json)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig, ModelConfig, QuantConfig, schema_keys, validate
from finetune.errors import UserError

log = logging.getLogger("finetune")


@dataclass
class Loaded:
    """A model loaded for inference, with the tokenizer it was trained with."""
    model: object
    tokenizer: object
    source: Optional[Path]   # the adapter (or merged/) folder it came from; None for a bare base
    quant: str               # how the base was loaded: nf4, int8 or none
    device: object           # finetune.model.Device


@dataclass
class Run:
    """A run directory written by `train` (or, for `eval recipe=`, the output folder of a bare base)."""
    dir: Path
    cfg: FinetuneConfig
    summary: dict = field(default_factory=dict)
    is_base: bool = False    # a base model without a training run: no adapter, the base's own tokenizer

    # ---- paths ----------------------------------------------------------------------------------

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.dir / "merged"

    @property
    def model_dir(self) -> Path:
        """A full fine-tune's model (lora.enabled=false)."""
        return self.dir / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    def output_dir(self, checkpoint: Optional[Path] = None) -> Path:
        """Where an export or eval is written: the run itself, or exports/checkpoint-N/ for a checkpoint's."""
        return self.dir / "exports" / checkpoint.name if checkpoint else self.dir

    # ---- opening, checking and creating ---------------------------------------------------------

    @classmethod
    def open(cls, path: str, overrides: Optional[list[str]] = None) -> "Run":
        """The run in `path`, its config read back into the schema with `overrides` applied and validated."""
        run_dir = Path(path).expanduser()
        if not run_dir.is_dir():
            raise UserError(f"run={path}: no such folder. Give the output_dir of a training run, e.g. "
                            "run=outputs/tiny_qlora/2026-01-01_12-00-00.")
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"run={path}: no config.yaml, so it is not a finetune run directory.")
        cfg = read_config(run_dir / "config.yaml", overrides or [], path)
        return cls(run_dir, cfg, read_summary(run_dir / "summary.json"))

    @classmethod
    def for_base(cls, cfg: FinetuneConfig) -> "Run":
        """`eval recipe=NAME`: the recipe's base model, no adapter, written to output_dir."""
        out_dir = Path(cfg.output_dir).expanduser()
        if (out_dir / "config.yaml").is_file():
            raise UserError(f"output_dir={out_dir} is a training run: evaluate its adapter with python -m finetune "
                            f"eval run={out_dir}")
        return cls(out_dir, cfg, is_base=True)

    @staticmethod
    def check_new(cfg: FinetuneConfig, processes: int = 1) -> tuple[Path, Optional[str]]:
        """output_dir for a training run and the checkpoint to resume from; writes nothing. An existing run is
        never overwritten unless overwrite=true; a checkpoint resumes with as many processes as wrote it."""
        run_dir = Path(cfg.output_dir).expanduser()
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"output_dir={run_dir} is a file, not a folder: choose another output_dir.")
        if cfg.resume:
            return run_dir, resume_checkpoint(run_dir / "checkpoints", processes)
        if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.overwrite:
            raise UserError(f"output_dir={run_dir} already holds a run and is never overwritten by default: pass "
                            "resume=true to continue it, overwrite=true to replace it, or choose another output_dir=...")
        return run_dir, None

    @classmethod
    def create(cls, cfg: FinetuneConfig, run_dir: Path) -> "Run":
        """The run directory (emptied first with overwrite=true), with config.yaml."""
        from finetune.registry import to_yaml

        try:
            if cfg.overwrite and run_dir.is_dir():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        except OSError as e:
            raise UserError(f"output_dir={run_dir}: cannot write there ({e.strerror}). Choose a writable "
                            "output_dir.") from None
        return cls(run_dir, cfg)

    # ---- checkpoints ----------------------------------------------------------------------------

    def checkpoint_dir(self, name: Optional[str]) -> Path:
        """checkpoints/checkpoint-N for checkpoint=N, checkpoint-N or last."""
        found = list_checkpoints(self.checkpoints_dir)
        if not found:
            raise UserError(f"checkpoint={name}: {self.checkpoints_dir} holds no checkpoints (train.save_steps sets how "
                            "often they are written).")
        if name == "last":
            return found[-1]
        want = name if str(name).startswith("checkpoint-") else f"checkpoint-{name}"
        for path in found:
            if path.name == want:
                return path
        raise UserError(f"checkpoint={name}: no such checkpoint in {self.checkpoints_dir}. Available: "
                        f"{', '.join(p.name.split('-')[-1] for p in found)}, or last.")

    # ---- summary.json and model cards -----------------------------------------------------------

    def write_summary(self, updates: dict, where: Optional[Path] = None, replace: bool = False) -> dict:
        """summary.json of the run (or of an export under `where`): `updates` merged into what it holds
        (everything replaced with replace=true), written whole to a temporary file and renamed into place."""
        path = (where or self.dir) / "summary.json"
        summary = finite(updates if replace else read_summary(path) | updates)
        tmp = path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
        if where is None or where == self.dir:
            self.summary = summary
        return summary

    def write_cards(self, summary: dict, where: Optional[Path] = None) -> None:
        """README.md, the model card, in each exported folder (adapter/, merged/, model/) of the run or of `where`."""
        from finetune import card

        root = where or self.dir
        for name, merged in (("adapter", False), ("merged", True), ("model", True)):
            folder = root / name
            if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
                card.write(folder, self.cfg, summary, merged=merged)

    # ---- loading back -------------------------------------------------------------------------------

    def adapter_source(self, checkpoint: Optional[str] = None) -> Path:
        """The adapter folder: adapter/, or checkpoints/checkpoint-N/ for checkpoint=N."""
        source = self.checkpoint_dir(checkpoint) if checkpoint else self.adapter_dir
        if not (source / "adapter_config.json").is_file():
            why = (f"this run trained every weight (lora.enabled=false): its model is {self.model_dir}"
                   if not self.cfg.lora.enabled else "pass checkpoint=N to use one of its checkpoints")
            raise UserError(f"{source} holds no adapter (adapter_config.json): {why}.")
        return source

    def merged_source(self, checkpoint: Optional[str] = None) -> Path:
        if checkpoint:
            raise UserError("checkpoint= picks an adapter; a checkpoint's merged model is in exports/checkpoint-N/merged, "
                            "written by `python -m finetune export run=RUN checkpoint=N export.merge=true`.")
        if not (self.merged_dir / "config.json").is_file():
            raise UserError(f"{self.merged_dir} holds no merged model: write it with "
                            f"python -m finetune export run={self.dir} export.merge=true")
        return self.merged_dir

    def tokenizer(self, source: Optional[Path] = None):
        """The tokenizer as trained, chat template and EOS included: saved with the adapter, the merged model and
        every checkpoint (adapter/'s where `source` has none). A bare base: its own, with the recipe's template."""
        if self.is_base:
            from finetune.data.templates import apply_chat_template_choice, use_end_of_turn
            from finetune.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.cfg.model)
            apply_chat_template_choice(tokenizer, self.cfg.data.chat_template)
            use_end_of_turn(tokenizer)
            return tokenizer
        from transformers import AutoTokenizer

        folder = source if source and (source / "tokenizer_config.json").is_file() else self.adapter_dir
        return AutoTokenizer.from_pretrained(str(folder))

    def load_for_inference(self, quant: Optional[str] = None, skip_modules: Optional[list] = None,
                           checkpoint: Optional[str] = None, adapter: bool = True, merged: bool = False) -> Loaded:
        """The model as trained, for inference: the base loaded in `quant` (nf4, int8, none; default: as trained,
        `skip_modules` kept unquantized; default: as trained) with the adapter (or a checkpoint's) on top, or
        without it (adapter=False); or merged/ (16-bit unless `quant` says otherwise)."""
        from finetune.model import attach_adapter, detect_device, load_base_model

        if merged:
            source = self.merged_source(checkpoint)
            model_cfg, quant_cfg = ModelConfig(name_or_path=str(source)), QuantConfig(method=quant or "none")
        else:
            source = None if self.is_base else self.adapter_source(checkpoint)
            model_cfg, quant_cfg = self.cfg.model, self.cfg.quant.at(quant or self.cfg.quant.method, skip_modules)
        device = detect_device(self.cfg.train, quant_cfg, self.cfg.model)
        tokenizer = self.tokenizer(source)
        model = load_base_model(model_cfg, quant_cfg, device)
        if adapter and source is not None and not merged:
            model = attach_adapter(model, source)
        return Loaded(model.eval(), tokenizer, source, quant_cfg.method, device)


@contextlib.contextmanager
def staged(final: Path):
    """A folder written whole or not at all: into a staging folder beside it, swapped in when complete, the old one
    removed only then. An interrupted write leaves the old folder as it was (a swap cut short between its two
    renames is finished the next time)."""
    tmp, old = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_config(path: Path, overrides: list[str], run_arg: str) -> FinetuneConfig:
    """A run's config.yaml in the schema, with `key=value` overrides applied, validated like a training config."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        stat = path.stat()
        cfg = copy.deepcopy(_schema_with(str(path), stat.st_mtime_ns, stat.st_size))
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().split("\n")[0]
        raise UserError(f"run={run_arg}: {path} does not fit this version of finetune ({first}).") from None
    for arg in overrides:
        key, _, raw = arg.partition("=")
        try:
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={raw}"]).v, merge=False)
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # a value YAML cannot read: a stray quote, & or !
            help_text = schema_keys()[key].metadata["help"]
            raise UserError(f"{arg}: {str(e).strip().splitlines()[0]} ({key}: {help_text}).") from None
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, FinetuneConfig)
    validate(obj)
    return obj


def finite(value):
    """NaN and infinities, which JSON cannot hold, as null: a figure that could not be measured."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@lru_cache(maxsize=8)
def _schema_with(path: str, mtime_ns: int, size: int):
    """config.yaml merged into the schema, once per version of the file (a tenth of a second each)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(FinetuneConfig), OmegaConf.load(path))


def read_summary(path: Path) -> dict:
    """summary.json as a dict; {} if there is none (a run stopped before its end) or it cannot be read."""
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
        return summary if isinstance(summary, dict) else {}
    except (ValueError, OSError) as e:
        log.warning("%s cannot be read (%s): its figures are rewritten from this run.", path, e)
        return {}


# ---- checkpoints: what the trainer writes, read back --------------------------------------------

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


def safetensors_problem(file: Path) -> Optional[str]:
    """Why a safetensors file cannot be read whole (truncated or garbled: safetensors checks the header against
    the file size), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
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
