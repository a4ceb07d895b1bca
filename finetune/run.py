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

from finetune.checkpoints import list_checkpoints, resume_changes, resume_checkpoint
from finetune.config import FinetuneConfig, ModelConfig, QuantConfig, schema_keys, validate
from finetune.errors import UserError, write_error

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
        never overwritten unless overwrite=true; a checkpoint resumes with as many processes as wrote it. A run
        another process is writing is refused; one that stopped before it saved anything is started over."""
        run_dir = Path(cfg.output_dir).expanduser()
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"output_dir={run_dir} is a file, not a folder: choose another output_dir.")
        check_unlocked(run_dir)
        if failed_start(run_dir):
            log.warning("output_dir=%s holds a run that stopped before its first checkpoint (nothing in it to keep "
                        "or resume): starting it over.", run_dir)
            return run_dir, None
        if cfg.resume:
            resume_from = resume_checkpoint(run_dir / "checkpoints", processes)
            if (run_dir / "config.yaml").is_file():
                resume_changes(read_config(run_dir / "config.yaml", [], str(run_dir)), cfg)
            return run_dir, resume_from
        if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.overwrite:
            raise UserError(f"output_dir={run_dir} already holds a run and is never overwritten by default: pass "
                            "resume=true to continue it, overwrite=true to replace it, or choose another output_dir=...")
        return run_dir, None

    @classmethod
    def create(cls, cfg: FinetuneConfig, run_dir: Path) -> "Run":
        """The run directory, locked by this process, with config.yaml. Emptied first with overwrite=true, or
        when it holds only a failed start."""
        from finetune.registry import to_yaml

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run(run_dir)
            if (cfg.overwrite and not cfg.resume) or failed_start(run_dir):
                for entry in run_dir.iterdir():
                    if entry != lock:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            write_whole(run_dir / "config.yaml", lambda tmp: tmp.write_text(to_yaml(cfg)))
        except OSError as e:
            raise UserError(f"output_dir={run_dir}: cannot write there ({e.strerror}). Choose a writable "
                            "output_dir.") from None
        return cls(run_dir, cfg)

    def unlock(self) -> None:
        """The run is no longer written by this process."""
        unlock_run(self.dir)

    @contextlib.contextmanager
    def locked(self):
        """This process writes the run (export, eval, publish) while the block runs."""
        lock_run(self.dir)
        try:
            yield self
        finally:
            self.unlock()

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
        write_whole(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n"))
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
        check_folder(source, "Nothing was loaded: pass checkpoint=N to use one of the run's checkpoints, or train again")
        return source

    def merged_source(self, checkpoint: Optional[str] = None) -> Path:
        if checkpoint:
            raise UserError("checkpoint= picks an adapter; a checkpoint's merged model is in exports/checkpoint-N/merged, "
                            "written by `python -m finetune export run=RUN checkpoint=N export.merge=true`.")
        again = f"python -m finetune export run={self.dir} export.merge=true"
        if not (self.merged_dir / "config.json").is_file():
            raise UserError(f"{self.merged_dir} holds no merged model: write it with {again}")
        check_folder(self.merged_dir, f"Nothing was loaded: write it again with {again}", whole=False)
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
                           checkpoint: Optional[str] = None, adapter: bool = True, merged: bool = False,
                           adapter_dir: Optional[Path] = None) -> Loaded:
        """The model as trained, for inference: the base loaded in `quant` (nf4, int8, none; default: as trained,
        `skip_modules` kept unquantized; default: as trained) with the adapter (or a checkpoint's, or the one in
        `adapter_dir`) on top, or without it (adapter=False); or merged/ (16-bit unless `quant` says otherwise)."""
        from finetune.model import attach_adapter, detect_device, load_base_model

        if merged:
            source = self.merged_source(checkpoint)
            model_cfg, quant_cfg = ModelConfig(name_or_path=str(source)), QuantConfig(method=quant or "none")
        else:
            source = None if self.is_base else adapter_dir or self.adapter_source(checkpoint)
            model_cfg, quant_cfg = self.cfg.model, self.cfg.quant.at(quant or self.cfg.quant.method, skip_modules)
        device = detect_device(self.cfg.train, quant_cfg, self.cfg.model)
        tokenizer = self.tokenizer(source)
        model = load_base_model(model_cfg, quant_cfg, device)
        if adapter and source is not None and not merged:
            model = attach_adapter(model, source)
        return Loaded(model.eval(), tokenizer, source, quant_cfg.method, device)


def folder_problems(folder: Path, whole: bool = True) -> list[str]:
    """What keeps a written folder (an adapter, a merged model) from loading: a safetensors file cut short or
    garbled (`whole`: every tensor read; else its header checked against the file's size), a JSON file that does not
    parse, an adapter_config.json without the settings PEFT needs, an adapter without its weights."""
    from finetune.checkpoints import safetensors_problem

    problems = []
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".safetensors":
            problems.append(safetensors_problem(f, whole))
        elif f.suffix == ".json":
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                problems.append(f"{f.name} is not valid JSON ({str(e)[:80]})")
    config = folder / "adapter_config.json"
    if config.is_file() and not any(problems):
        problems.append(adapter_config_problem(json.loads(config.read_text())))
        if not any((folder / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin")):
            problems.append("adapter_config.json is there but adapter_model.safetensors is not")
    return [p for p in problems if p]


def adapter_config_problem(config) -> Optional[str]:
    """adapter_config.json holds what PEFT reads, with the right types."""
    if not isinstance(config, dict):
        return "adapter_config.json does not hold an object of settings"
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not (isinstance(config.get("peft_type"), str) and isinstance(r, int) and r > 0
            and isinstance(alpha, (int, float)) and isinstance(targets, (list, str))):
        return "adapter_config.json lacks peft_type, r, lora_alpha or target_modules, or holds them with wrong types"
    return None


def check_folder(folder: Path, then: str, whole: bool = True) -> None:
    """One message for a damaged folder, before anything loads or uploads it: its problems, then `then` (what was
    not done, and what to do)."""
    problems = folder_problems(folder, whole)
    if problems:
        raise UserError(f"{folder} is damaged: {'; '.join(problems)}. {then}.")


def write_whole(path: Path, write) -> None:
    """A file written whole or not at all: `write(tmp)` fills a temporary file beside it, renamed into place."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_error(e)
        if reason is None:
            raise
        kept = f" The {final.name}/ already there is kept." if final.exists() else ""
        raise UserError(f"Could not write {final} ({reason}): free space or fix the folder's permissions, "
                        f"then run the same command again.{kept}") from None
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

    from finetune.registry import register_asset_resolver

    register_asset_resolver()  # (the SFT demo run shipped among the assets names its model and data so)
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
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # an empty or cut-short config.yaml: the schema's own ${now:...} is left
        raise UserError(f"run={run_arg}: {path} is incomplete ({str(e).strip().splitlines()[0]}): it is not the "
                        "config.yaml training wrote.") from None
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


# ---- who writes a run directory -----------------------------------------------------------------

LOCK = ".lock"
FAILED_START = {"config.yaml", "metrics.jsonl", "loss.png", "wandb", "checkpoints", LOCK}  # what a start writes first


def failed_start(run_dir: Path) -> bool:
    """run_dir holds only what a run writes before its first checkpoint: it stopped (an error, a signal, a kill)
    with nothing to keep or resume, so the same command may start it over."""
    if not (run_dir / "config.yaml").is_file():
        return False
    entries = {p.name for p in run_dir.iterdir() if not (p.name.endswith(".partial") or p.name.startswith(LOCK))}
    ckpts = run_dir / "checkpoints"
    return entries <= FAILED_START and not (ckpts.is_dir() and any(p.name.startswith("checkpoint-")
                                                                       for p in ckpts.iterdir()))


def process_start(pid: int) -> Optional[str]:
    """When a process started (Linux: /proc/PID/stat's start time), so a PID reused by another process is not
    taken for the lock's owner; None where that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def lock_owner(run_dir: Path) -> Optional[dict]:
    """The process that holds run_dir's lock while it is still running; None when free, when its owner is gone
    (a kill -9, a power cut: a stale lock) or when it is this process."""
    import socket

    owner = read_lock(run_dir / LOCK)
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if owner.get("host") != socket.gethostname():
        return owner  # another machine's process (a shared disk): it cannot be checked from here
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process
    return owner if owner.get("start") in (None, process_start(pid)) else None


def check_unlocked(run_dir: Path) -> None:
    owner = lock_owner(run_dir)
    if owner:
        raise UserError(f"{run_dir} is being written by another process (PID {owner.get('pid')} on "
                        f"{owner.get('host')}, since {owner.get('since')}): wait for it to finish, stop it, or "
                        f"choose another output_dir. If no such process is running, delete {run_dir / LOCK}.")


def lock_run(run_dir: Path) -> Path:
    """Take run_dir's lock (.lock: this process's PID, host and start), or say who holds it. A stale lock is
    taken over, with a line saying whose it was."""
    import socket
    import time

    path, tmp = run_dir / LOCK, run_dir / f"{LOCK}.{os.getpid()}"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        tmp.write_text(json.dumps(me) + "\n")
    except OSError as e:
        raise UserError(f"{run_dir}: cannot write there ({e.strerror}).") from None
    try:
        os.link(tmp, path)  # fails if a lock is there: of two processes starting at once, one gets it
    except FileExistsError:
        check_unlocked(run_dir)
        if read_lock(path).get("pid") != os.getpid():
            log.warning("Taking over %s: the process that held it (%s) is no longer running.", path,
                        path.read_text(errors="replace").strip()[:200])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unlock_run(run_dir: Path) -> None:
    """Let go of run_dir's lock, if this process holds it."""
    if read_lock(run_dir / LOCK).get("pid") == os.getpid():
        (run_dir / LOCK).unlink(missing_ok=True)


def read_lock(path: Path) -> dict:
    """A lock file's contents; {} when there is none or it is not one (a lock cut short is stale)."""
    try:
        owner = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}
