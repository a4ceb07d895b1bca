"""Finds configs/ and recipes/ (in a checkout or inside the installed wheel) and composes a run's config.

Recipes are registered in Hydra's ConfigStore as group `recipe` (package `_global_`), so `recipe=NAME`
selects one. Composition uses Hydra's compose API: it creates no outputs/ or .hydra/ folders, no log
files, and never changes directory. Every mistake in the overrides becomes one UserError naming the
key, the allowed values and the closest match.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from finetune.config import GROUPS, FinetuneConfig, register_schema, schema_keys, validate
from finetune.errors import UserError, closest

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
DEFAULT_RECIPE = "tiny_qlora"


def _folder(name: str) -> Path:
    """configs/ or recipes/: the checkout's top-level folder, else the copy packed into the wheel."""
    for candidate in (PACKAGE.parent / name, PACKAGE / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"finetune is installed without its {name}/ folder (looked in {PACKAGE.parent} and {PACKAGE})")


def config_dir() -> Path:
    return _folder("configs")


def recipes_dir() -> Path:
    return _folder("recipes")


def recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def group_options(group: str) -> list[str]:
    if group == "recipe":
        return recipes()
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def asset(name: str) -> str:
    """`${asset:tiny_llama}` in a config: a file or folder shipped in finetune/assets/."""
    path = ASSETS / name
    if not path.exists():
        raise UserError(f"${{asset:{name}}}: no such asset; available: {', '.join(sorted(p.name for p in ASSETS.iterdir()))}.")
    return str(path)


def register_asset_resolver() -> None:
    """`${asset:NAME}` resolvable: in recipes and group options, and in a config.yaml shipped among the assets."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset)


@lru_cache(maxsize=None)
def _register() -> None:
    from hydra.core.config_store import ConfigStore

    register_asset_resolver()
    register_schema()
    store = ConfigStore.instance()
    for name in recipes():
        node = OmegaConf.load(recipes_dir() / f"{name}.yaml")
        store.store(group="recipe", name=name, node=node, package="_global_")


def check_overrides(overrides: list[str]) -> list:
    """Reject unknown keys, unknown group options and appended keys before Hydra sees them; returns Hydra's parse of
    the overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        first = str(e).split("\n")[:2]
        raise UserError(f"Cannot parse the override: {' '.join(first)}. Write overrides as key=value, e.g. train.learning_rate=1e-4.")
    keys = schema_keys()
    problems = []
    for o in parsed:
        key = o.key_or_group
        if key in GROUPS + ["recipe"] and not o.is_delete():
            choice = o.value()
            options = group_options(key)
            if not isinstance(choice, str) or choice not in options:
                what = "recipe" if key == "recipe" else f"option '{choice}' for group '{key}'"
                problems.append(
                    f"Unknown {what}{' ' + repr(choice) if key == 'recipe' else ''} (in '{o.input_line}'). "
                    f"Available: {', '.join(options)}.{closest(str(choice), options)}"
                )
        elif key not in keys:
            group = key.split(".")[0]
            if group in GROUPS:
                where, listing = f" in '{group}'", [k for k in keys if k.startswith(group + ".")]
            else:
                where, listing = "", [k for k in keys if "." not in k] + GROUPS
            problems.append(f"Unknown config key '{key}' (in '{o.input_line}').{closest(key, keys)} "
                            f"Keys{where}: {', '.join(listing)}.")
        elif o.is_add() or o.is_delete():
            problems.append(f"'{o.input_line}': keys cannot be added or removed; set it with {key}=VALUE.")
    if problems:
        raise UserError(*problems)
    return parsed


def _composition_error(e: Exception) -> UserError:
    """Hydra/OmegaConf composition error -> one message with the key and what was expected."""
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    typ = getattr(cause, "object_type", None)
    if isinstance(cause, ConfigKeyError) and dataclasses.is_dataclass(typ):  # a typo inside a list entry
        names = [f.name for f in dataclasses.fields(typ)]
        return UserError(f"Unknown key '{cause.key}' in a {typ.__name__} entry.{closest(str(cause.key), names)} "
                         f"Keys: {', '.join(names)}.")
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        f = schema_keys().get(key)
        expected = ""
        if f is not None:
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            expected = f" Expected a value of type {typ.replace('Optional[', '').rstrip(']')}" + (
                f" ({f.metadata['help']})." if f.metadata.get("help") else "."
            )
        msg = str(cause.msg if hasattr(cause, "msg") else cause).split("\n")[0]
        return UserError(f"{key}: {msg}.{expected}")
    first = str(e).strip().split("\n")
    return UserError(" ".join(line.strip() for line in first if line.strip()))


def compose(overrides: list[str]) -> DictConfig:
    """The composed (unresolved) config for these command-line overrides (a copy: the caller may resolve it).

    As Hydra does, the overrides that pick group options (recipe=, model=, ...) build the defaults tree and the rest
    set values on the result, with Hydra's own code for each step. The tree is composed once per choice of options in
    a process (a quarter to half a second); setting values takes milliseconds."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    _register()
    picks, values = [], []
    for o in check_overrides(overrides):
        (picks if o.key_or_group in GROUPS + ["recipe"] and not isinstance(o.value(), dict) else values).append(o)
    cfg = copy.deepcopy(_composed(tuple(o.input_line for o in picks)))
    try:
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except Exception as e:  # Hydra wraps user mistakes in a few exception types; all become one message
        raise _composition_error(e) from None
    return cfg


@lru_cache(maxsize=64)
def _composed(picks: tuple) -> DictConfig:
    """Hydra's composition of the defaults tree for these group choices, once per choice in a process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose(config_name="train", overrides=list(picks), return_hydra_config=True)
    except Exception as e:  # Hydra wraps user mistakes in a few exception types; all become one message
        raise _composition_error(e) from None
    recipe = cfg.hydra.runtime.choices.get("recipe") or DEFAULT_RECIPE
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.recipe = recipe
    return cfg


def load_config(overrides: Optional[list[str]] = None) -> FinetuneConfig:
    """Compose, resolve and validate: the typed config of a run, or one UserError listing every problem."""
    cfg = compose(list(overrides or []))
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except OmegaConfBaseException as e:
        raise _composition_error(e) from None
    assert isinstance(obj, FinetuneConfig)
    validate(obj)
    check_eval_source(obj, overrides or [])
    return obj


def check_eval_source(cfg: FinetuneConfig, overrides: list[str]) -> None:
    """`data.path=mine.jsonl` alone: the data group's eval file belongs to the group's data, not to the user's, so
    data.eval_fraction of the user's rows are held out instead (an explicit data.eval_path still wins)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "data.path" not in keys or "data" in keys:
        return
    inherited = [k for k in ("eval_path", "eval_split") if f"data.{k}" not in keys and getattr(cfg.data, k)]
    if inherited and not {"data.eval_path", "data.eval_split"} & keys:
        logging.getLogger("finetune").info(
            "data.path=%s: holding out data.eval_fraction=%g of it for eval (not the data group's %s; set "
            "data.eval_path or data.eval_split to evaluate on data of yours)", cfg.data.path, cfg.data.eval_fraction,
            " and ".join(f"{k}={getattr(cfg.data, k)}" for k in inherited))
        for key in inherited:
            setattr(cfg.data, key, None)


def to_yaml(cfg: FinetuneConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)
