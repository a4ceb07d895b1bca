"""An existing run directory, and the `key=value` arguments of the verbs that work on one.

`export`, `generate` and `publish` take `run=RUN_DIR` plus a few keys of their own (checkpoint=,
prompt=, ...) and, where it makes sense, overrides of the run's own config groups (export.*, hub.*).
The run's config.yaml is read back into the typed schema, the overrides are applied and the result is
validated like a training config, so a typo or a bad value gets the same one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config import FinetuneConfig, _check_field, opt, schema_keys, validate
from finetune.errors import UserError, closest


@dataclass
class ExportArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml and adapter/)")
    checkpoint: Optional[str] = opt(None, "export checkpoints/checkpoint-N instead of the final adapter: N, the "
                                    "folder name, or last; written to RUN_DIR/exports/checkpoint-N/")


@dataclass
class GenerateArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml and adapter/)")
    prompt: Optional[str] = opt(None, "one prompt, formatted with the run's chat template")
    prompts_file: Optional[str] = opt(None, "a .txt file (one prompt per line) or .jsonl file (a 'prompt' field per row)")
    system: Optional[str] = opt(None, "system message put before each prompt")
    model: str = opt("adapter", "what to load: the base with the adapter, or merged/", ["adapter", "merged"])
    checkpoint: Optional[str] = opt(None, "use checkpoints/checkpoint-N's adapter: N, the folder name, or last")
    quant: Optional[str] = opt(None, "how the base is loaded under the adapter; null = as in training",
                               ["nf4", "int8", "none"])
    compare: bool = opt(False, "also answer with the untouched base and print both side by side")
    max_new_tokens: int = opt(256, "token limit of each answer (generation stops earlier at EOS)", min=1)
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.7, "sampling temperature", min=0, min_exclusive=True)
    top_p: float = opt(0.9, "nucleus sampling: smallest token set with this much probability", min=0, max=1,
                       min_exclusive=True)
    top_k: int = opt(50, "sample among the k likeliest tokens; 0 = no limit", min=0)
    seed: int = opt(0, "seed for sampling")
    stream: bool = opt(True, "print tokens as they are generated (one prompt at a time)")


@dataclass
class EvalArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml and adapter/); or recipe=NAME for a bare base model")
    checkpoint: Optional[str] = opt(None, "evaluate checkpoints/checkpoint-N's adapter: N, the folder name, or last; "
                                    "written to RUN_DIR/exports/checkpoint-N/")


@dataclass
class PublishArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml, summary.json and adapter/ or merged/)")


# Each verb's own arguments, and the keys of the run's config it may override (a prefix ending in '.' = a group).
VERB_ARGS = {"export": (ExportArgs, ["export.", "model.hub_id"]), "generate": (GenerateArgs, []),
             "publish": (PublishArgs, ["hub.", "model.hub_id"]),
             "eval": (EvalArgs, ["eval.quant", "eval.task", "eval.max_new_tokens", "eval.batch_size", "eval.harness_tasks",
                                 "eval.harness_include", "eval.harness_limit", "quant.skip_modules",
                                 "data.eval_max_samples"])}


def overridable(verb: str) -> list[str]:
    """The run-config keys `verb` accepts as overrides."""
    prefixes = VERB_ARGS[verb][1]
    return [k for k in schema_keys() if any(k == p or (p.endswith(".") and k.startswith(p)) for p in prefixes)]


def _parse_value(key: str, f: dataclasses.Field, raw: str):
    """The raw command-line text as the field's type. Strings are taken verbatim (prompts may hold any character)."""
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})  # noqa: S307 (our own annotations)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if optional and raw in ("null", "None", "~"):
        return None
    if base is str:
        return raw
    if base is bool:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise UserError(f"{key}={raw}: expected true or false.")
    try:
        return base(raw)
    except ValueError:
        raise UserError(f"{key}={raw}: expected {'an integer' if base is int else 'a number'} ({f.metadata['help']}).") from None


def parse_verb_args(verb: str, argv: list[str]):
    """(the verb's arguments, the config overrides for the run) from `key=value` arguments."""
    cls = VERB_ARGS[verb][0]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    config_keys = overridable(verb)
    values, overrides, problems = {}, [], []
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            problems.append(f"'{arg}' is not key=value: e.g. run=outputs/tiny_qlora/2026-01-01_12-00-00.")
        elif key in fields:
            values[key] = _parse_value(key, fields[key], raw)
            problems.append(_check_field(key, fields[key], values[key]))
        elif key in config_keys:
            overrides.append(arg)
        else:
            allowed = list(fields) + config_keys
            problems.append(f"Unknown key '{key}' for `{verb}`.{closest(key, allowed)} Keys: {', '.join(allowed)}.")
    missing = [n for n, f in fields.items() if f.default is MISSING and n not in values]
    problems += [f"`{verb}` needs {n}=...: the {fields[n].metadata['help']}." for n in missing]
    problems = [p for p in problems if p]
    if problems:
        raise UserError(*problems)
    return cls(**values), overrides


@dataclass
class Run:
    """A run directory written by `train`: its config, summary and exported folders."""
    dir: Path
    cfg: FinetuneConfig
    summary: dict = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.dir / "merged"

    def tokenizer_dir(self, source: Path) -> Path:
        """Where the tokenizer as trained is (chat template and EOS included): saved with the adapter, with
        the merged model and in every checkpoint; adapter/ where `source` has none."""
        return source if (source / "tokenizer_config.json").is_file() else self.adapter_dir

    def checkpoint_dir(self, name: Optional[str]) -> Path:
        """checkpoints/checkpoint-N for checkpoint=N, checkpoint-N or last."""
        from finetune.trainer import list_checkpoints

        root = self.dir / "checkpoints"
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"checkpoint={name}: {root} holds no checkpoints (train.save_steps sets how often they "
                            "are written).")
        if name == "last":
            return found[-1]
        want = name if str(name).startswith("checkpoint-") else f"checkpoint-{name}"
        for path in found:
            if path.name == want:
                return path
        raise UserError(f"checkpoint={name}: no such checkpoint in {root}. Available: "
                        f"{', '.join(p.name.split('-')[-1] for p in found)}, or last.")


def load_run(path: str, overrides: Optional[list[str]] = None) -> Run:
    """The run in `path`, its config read back into the schema with `overrides` applied and validated."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run={path}: no such folder. Give the output_dir of a training run, e.g. "
                        "run=outputs/tiny_qlora/2026-01-01_12-00-00.")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"run={path}: no config.yaml, so it is not a finetune run directory.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), OmegaConf.load(config))
    except OmegaConfBaseException as e:
        first = str(e).strip().split("\n")[0]
        raise UserError(f"run={path}: {config} does not fit this version of finetune ({first}).") from None
    for arg in overrides or []:
        key, _, raw = arg.partition("=")
        try:
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={raw}"]).v, merge=False)
        except OmegaConfBaseException as e:
            help_text = schema_keys()[key].metadata["help"]
            raise UserError(f"{arg}: {str(e).strip().splitlines()[0]} ({key}: {help_text}).") from None
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, FinetuneConfig)
    validate(obj)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Run(run_dir, obj, summary)
