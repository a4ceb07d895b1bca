"""Every recipe composes and validates; every user mistake is one clear UserError."""

import pytest
import torch

from finetune.config import FinetuneConfig, QuantConfig, TrainConfig, ModelConfig, validate
from finetune.errors import UserError
from finetune.registry import group_options, load_config, recipes

RECIPES = ["tiny_qlora", "qlora_llama7b", "qlora_llama3_8b", "qlora_mistral7b", "lora_phi2", "int8_gptneo_1_3b"]


def test_the_issue_recipes_are_all_shipped():
    assert set(RECIPES) <= set(recipes())


@pytest.mark.parametrize("recipe", recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg = load_config([f"recipe={recipe}"])
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.recipe == recipe
    assert cfg.output_dir.startswith(f"outputs/{recipe}/")


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "quant", "lora", "data", "train", "tracking", "export")
                                          for o in group_options(g)])
def test_every_group_option_composes(group, option):
    """Each option composes, validates, and its values are the ones its file sets (the schema has the rest)."""
    import yaml

    from finetune.registry import config_dir

    overrides = [f"{group}={option}"]
    if (group, option) == ("lora", "off"):
        overrides += ["quant=none", "export=adapter"]  # full fine-tuning: valid only with a 16-bit base
    cfg = getattr(load_config(overrides), group)
    values = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text()) or {}
    for key, value in values.items():
        if not (isinstance(value, str) and "${" in value):  # ${asset:...} resolves to a path
            assert getattr(cfg, key) == value, (group, option, key)


def test_qlora_llama7b_is_the_qlora_paper_setup():
    cfg = load_config(["recipe=qlora_llama7b"])
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (cfg.quant.method, cfg.quant.double_quant) == ("nf4", True)
    assert (cfg.lora.r, list(cfg.lora.target_modules)) == (16, ["all-linear"])
    assert cfg.train.optim == "paged_adamw_8bit" and cfg.train.gradient_checkpointing
    assert cfg.data.max_length == 2048
    assert cfg.tracking.backend == "wandb"


def test_recipes_differ_where_they_should():
    assert load_config(["recipe=lora_phi2"]).quant.method == "none"
    assert load_config(["recipe=int8_gptneo_1_3b"]).quant.method == "int8"
    assert load_config([]).tracking.mode == "offline"  # the demo needs no W&B account


def test_overrides_reach_the_typed_config():
    cfg = load_config(["train.learning_rate=1e-4", "lora.r=8", "lora.target_modules=[q_proj,v_proj]", "quant=int8"])
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.quant.method == "int8" and cfg.quant.double_quant is False


def message(overrides):
    with pytest.raises(UserError) as e:
        load_config(overrides)
    return str(e.value)


@pytest.mark.parametrize("overrides,expected", [
    (["train.lerning_rate=1e-4"], ["Unknown config key 'train.lerning_rate'", "Did you mean 'train.learning_rate'?"]),
    (["lr=1e-4"], ["Unknown config key 'lr'", "Did you mean 'train.learning_rate'?"]),
    (["per_device_train_batch_size=2"], ["Did you mean 'train.micro_batch_size'?"]),
    (["+train.foo=1"], ["Unknown config key 'train.foo'"]),
    (["recipe=qlora_lama7b"], ["Unknown recipe 'qlora_lama7b'", "Did you mean 'qlora_llama7b'?", "tiny_qlora"]),
    (["quant=nf8"], ["Unknown option 'nf8' for group 'quant'", "Available: int8, nf4, none", "Did you mean 'nf4'?"]),
    (["train.learning_rate=fast"], ["train.learning_rate", "'fast'", "float"]),
    (["lora.r=2.5"], ["lora.r", "int"]),
    (["train.optim=adamw"], ["train.optim=adamw is not allowed", "paged_adamw_8bit", "Did you mean 'adamw_8bit'?"]),
    (["train.learning_rate=-1"], ["train.learning_rate=-1.0 is out of range: it must be > 0"]),
    (["lora.dropout=2"], ["lora.dropout=2.0 is out of range: it must be <= 0.9"]),
    (["train.max_steps"], ["Cannot parse the override", "key=value"]),
])
def test_user_mistakes_name_the_key_the_allowed_values_and_the_closest_match(overrides, expected):
    text = message(overrides)
    for part in expected:
        assert part in text


def test_cross_field_problems_are_reported_together():
    text = message(["quant=int8", "quant.double_quant=true", "lora.enabled=false", "resume=true", "overwrite=true"])
    assert text.startswith("4 problems:")
    assert "quant.double_quant=true is a 4-bit (nf4) option but quant=int8" in text
    assert "quantized base weights cannot be trained" in text
    assert "resume=true and overwrite=true" in text
    assert "export.merge=true needs LoRA" in text


def test_4bit_compute_dtype_must_agree_with_training_precision():
    assert "quant.compute_dtype=float16 but train.precision=bf16" in message(
        ["quant.compute_dtype=float16", "train.precision=bf16"])
    load_config(["quant.compute_dtype=bfloat16", "train.precision=bf16"])


def test_validate_is_usable_without_hydra():
    cfg = FinetuneConfig(model=ModelConfig(name_or_path="x"))
    cfg.data.path = "d.jsonl"
    validate(cfg)
    cfg.train.warmup_ratio = 0.9
    with pytest.raises(UserError, match="train.warmup_ratio=0.9 is out of range"):
        validate(cfg)


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    from finetune.model import detect_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: False)
    with pytest.raises(UserError, match="train.precision=bf16 but the GPU \\(Tesla T4\\) has no bf16 support"):
        detect_device(TrainConfig(precision="bf16"), QuantConfig(), ModelConfig(name_or_path="x"))
    auto = detect_device(TrainConfig(precision="auto"), QuantConfig(), ModelConfig(name_or_path="x"))
    assert (auto.precision, auto.compute_dtype) == ("fp16", torch.float16)


def test_cpu_precision_and_kernels(monkeypatch):
    from finetune.model import detect_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = detect_device(TrainConfig(), QuantConfig(), ModelConfig(name_or_path="x"))
    assert (auto.type, auto.precision, auto.compute_dtype) == ("cpu", "fp32", torch.float32)
    with pytest.raises(UserError) as e:
        detect_device(TrainConfig(precision="fp16", liger_kernel=True, compile=True), QuantConfig(),
                      ModelConfig(name_or_path="x", attn_implementation="flash_attention_2"))
    assert len(e.value.problems) == 4 and "train.compile=true is for CUDA GPUs" in str(e.value)


@pytest.mark.parametrize("device, model_type, installed, on", [
    ("cuda", "llama", True, True), ("cuda", "llama", False, False), ("cuda", "qwen3", True, False),
    ("cpu", "llama", True, False)])
def test_liger_is_on_by_default_only_where_it_was_measured(monkeypatch, device, model_type, installed, on):
    """train.liger_kernel=null: on for the Llama family on a CUDA GPU with liger-kernel installed (the H200 run:
    faster, less memory, the same losses); another family or no GPU: off; a value given is kept."""
    import importlib.util
    from types import SimpleNamespace

    from finetune.trainer import settle_liger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if installed and name == "liger_kernel"
                        else None if name == "liger_kernel" else real(name, *a))
    model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    train = TrainConfig()
    settle_liger(train, device, model)
    assert train.liger_kernel is on
    given = TrainConfig(liger_kernel=False)
    settle_liger(given, device, model)
    assert given.liger_kernel is False


def test_a_users_own_file_holds_out_its_eval_rows(caplog):
    """data.path alone: the demo group's eval file is not the user's; data.eval_fraction of theirs is held out."""
    import logging

    with caplog.at_level(logging.INFO, logger="finetune"):
        cfg = load_config(["data.path=mine.jsonl"])
    assert cfg.data.eval_path is None and cfg.data.eval_fraction == 0.05
    assert "data.path=mine.jsonl: holding out data.eval_fraction=0.05 of it for eval" in caplog.text
    assert load_config(["data.path=mine.jsonl", "data.eval_path=theirs.jsonl"]).data.eval_path == "theirs.jsonl"
    ultrachat = load_config(["recipe=qlora_llama7b", "data.path=mine.jsonl"]).data  # its test split is not in mine
    assert (ultrachat.eval_split, ultrachat.eval_path) == (None, None)
    assert load_config(["recipe=qlora_llama7b", "data.path=org/set", "data.eval_split=dev"]).data.eval_split == "dev"


def test_periodic_eval_needs_an_eval_split():
    text = message(["data.path=mine.jsonl", "data.eval_path=null", "data.eval_fraction=0", "train.eval_steps=50"])
    assert "train.eval_steps=50 needs an eval split" in text


def test_packing_with_remote_modelling_code_is_refused_with_the_other_problems():
    text = message(["data.packing=true", "model.trust_remote_code=true", "resume=true", "overwrite=true"])
    assert text.startswith("2 problems:") and "data.packing=true relies on transformers" in text


def test_each_mixed_source_is_checked_like_the_rest():
    text = message(["data.path=null", "data.eval_path=null",
                    "data.sources=[{path: a.jsonl, weight: 0}, {path: b.jsonl, format: csv}]"])
    assert "data.sources[0].weight=0.0 is out of range: it must be > 0" in text
    assert "data.sources[1].format=csv is not allowed" in text


def test_each_default_lives_in_one_place():
    """A group file sets only what differs from the schema's defaults, and a recipe only what differs from the
    schema and the group options it picks: a default is never written twice."""
    import dataclasses

    import yaml

    from finetune.registry import config_dir, recipes_dir

    groups = {f.name: f.default_factory for f in dataclasses.fields(FinetuneConfig)
              if dataclasses.is_dataclass(f.default_factory)}

    def baseline(group: str, option: str | None = None) -> dict:
        values = dataclasses.asdict(groups[group]())
        return values | (yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text()) or {} if option else {})

    repeated = [f"{p.parent.name}/{p.name}: {key}" for p in config_dir().glob("*/*.yaml") if p.parent.name in groups
                for key, value in (yaml.safe_load(p.read_text()) or {}).items() if baseline(p.parent.name)[key] == value]
    primary = {k: v for d in yaml.safe_load((config_dir() / "train.yaml").read_text())["defaults"] if isinstance(d, dict)
               for k, v in d.items()}
    for path in recipes_dir().glob("*.yaml"):
        recipe = yaml.safe_load(path.read_text())
        choice = primary | {k.removeprefix("override /"): v for d in recipe["defaults"] for k, v in d.items()}
        repeated += [f"{path.name}: {group}.{key}" for group, values in recipe.items() if group in groups
                     for key, value in values.items() if baseline(group, choice[group])[key] == value]
    assert repeated == []
