"""The `key=value` arguments of the verbs that work on a finished run: export, generate, eval and publish.

Each takes `run=RUN_DIR` plus a few keys of its own (checkpoint=, prompt=, ...) and, where it makes sense,
overrides of the run's own config keys (export.*, hub.*, ...), which finetune.run applies to the run's
config.yaml and validates like a training config: a typo or a bad value gets the same one-line error.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from finetune.config import SEED_MAX, check_field, opt, schema_keys
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
    seed: int = opt(0, "seed for sampling", min=0, max=SEED_MAX)
    stream: bool = opt(True, "print tokens as they are generated (one prompt at a time)")


@dataclass
class EvalArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml and adapter/); or recipe=NAME for a bare base model")
    checkpoint: Optional[str] = opt(None, "evaluate checkpoints/checkpoint-N's adapter: N, the folder name, or last; "
                                    "written to RUN_DIR/exports/checkpoint-N/")
    compare: Optional[str] = opt(None, "models made from the run, side by side with it: run directories (prune.heal, "
                                 "distill) and model folders (prune) separated by commas; with the GPU-hours each took "
                                 "on plan.gpu; written to RUN_DIR/compare/ (eval recipe=NAME compare=...: beside the base)")


@dataclass
class PublishArgs:
    run: str = opt(MISSING, "run directory (holds config.yaml, summary.json and adapter/ or merged/)")


@dataclass
class PruneArgs:
    run: str = opt(MISSING, "run directory: its merged/ model, or its base with the adapter merged in, is pruned")


# Each verb's own arguments, and the keys of the run's config it may override (a prefix ending in '.' = a group).
OFFLOAD = ["model.offload", "model.max_memory.", "model.offload_folder"]  # a model bigger than the GPU
VERB_ARGS = {"export": (ExportArgs, ["export.", "model.hub_id"]), "generate": (GenerateArgs, OFFLOAD),
             "publish": (PublishArgs, ["hub.", "model.hub_id"]),
             "eval": (EvalArgs, ["eval.quant", "eval.task", "eval.max_new_tokens", "eval.batch_size", "eval.harness_tasks",
                                 "eval.harness_include", "eval.harness_limit", "quant.skip_modules",
                                 "data.eval_max_samples", "plan.gpu", *OFFLOAD]),
             "prune": (PruneArgs, ["prune.", "distill.top_k", "distill.alpha", "distill.loss", "distill.temperature",
                                   "data.eval_max_samples", "eval.exact_match_samples", "eval.max_new_tokens",
                                   "overwrite", "plan.gpu"])}


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
            problems.append(check_field(key, fields[key], values[key]))
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
