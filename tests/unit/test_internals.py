"""The private internals of other libraries that finetune relies on, one test each: if an upgrade moves one,
this fails by name, instead of a run that silently stops writing checkpoints atomically, resumes in the wrong
dtype, reports no token count, or trains without gradient all-reduce. pyproject.toml caps each library below
its next major version for the same reason."""

import inspect

import pytest
import torch


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_trainers_checkpoint_methods_we_override():
    """finetune.trainer.checkpoint_mixin overrides these to stage checkpoints and keep the adapters' dtypes."""
    from transformers import Trainer

    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert parameters(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert parameters(Trainer._get_output_dir) == ["self", "trial"]


def test_rotate_checkpoints_takes_the_arguments_we_pass():
    from transformers.trainer_utils import rotate_checkpoints

    assert {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(parameters(rotate_checkpoints))


def test_trl_counts_the_trained_tokens_in_total_train_tokens():
    """summary.json's train_tokens (and tokens/s) is read from SFTTrainer._total_train_tokens."""
    from trl import SFTTrainer

    source = inspect.getsource(SFTTrainer)
    assert "self._total_train_tokens = 0" in source and "self._total_train_tokens +=" in source


def test_accelerate_marks_a_prepared_model_and_skips_it_next_time():
    """finetune.trainer.unmark_prepared clears the mark after the base is evaluated, or DDP would never wrap it."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare_model(torch.nn.Linear(2, 2), evaluation_mode=True)
    assert model._is_accelerate_prepared is True


def test_transformers_matches_module_names_as_the_skip_list_check_assumes():
    """finetune.model.check_skip_modules asks transformers which layers quant.skip_modules keeps unquantized."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert should_convert_module("model.layers.1.mlp.up_proj", ["model.layers.0"])
    assert not should_convert_module("model.layers.0.mlp.up_proj", ["model.layers.0"])
    assert not should_convert_module("lm_head", ["lm_head"])


def test_bitsandbytes_4bit_layers_have_the_cpu_repacking_switch():
    """finetune.model.keep_4bit_cpu_layers_differentiable turns this off so training keeps its gradients."""
    import bitsandbytes as bnb

    assert hasattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu")


def test_trl_patches_known_chat_templates_for_assistant_masks():
    """finetune.data.tokenize asks TRL for a training variant of a template without {% generation %} marks."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    assert callable(get_training_chat_template)
    assert has_generation_markers("{% generation %}x{% endgeneration %}") and not has_generation_markers("x")


@pytest.mark.parametrize("package", ["transformers", "trl", "accelerate", "bitsandbytes", "peft"])
def test_installed_versions_are_within_the_pinned_range(package):
    """The installed version is one pyproject.toml admits (what this suite tested)."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    (pin,) = [r for r in map(Requirement, requires("finetune")) if r.name == package and not r.marker]
    assert pin.specifier.contains(version(package), prereleases=True), (package, version(package), str(pin))


def test_the_login_command_we_recommend_is_the_installed_one():
    """huggingface_hub 1.x ships `hf` (`hf auth login`) and no longer `huggingface-cli`: every message and the
    README name the command a user has."""
    import re
    from importlib.metadata import entry_points

    from finetune.tokenizer import hub_load_error
    from tests.helpers import ROOT

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("hf", "").startswith("huggingface_hub.cli")
    assert "`hf auth login`" in str(hub_load_error("model.name_or_path", "org/x", OSError("gated")))
    texts = [ROOT / "README.md", *sorted((ROOT / "finetune").rglob("*.py"))]
    assert not [p for p in texts if re.search(r"huggingface-cli", p.read_text())]


def test_hydra_applies_value_overrides_to_a_composed_config():
    """finetune.registry.compose composes the defaults tree once per choice of group options and sets the other
    overrides with Hydra's own step for them, as Hydra's compose does after building the tree."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": {"b": 1}})
    OmegaConf.set_struct(cfg, True)
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(["a.b=2"]), cfg)
    assert cfg.a.b == 2


def test_peft_converts_a_config_for_transformers_5_mixtures_of_experts():
    """finetune.lora.as_peft_applies_it runs this conversion on the meta skeleton to know what PEFT will adapt."""
    from peft.utils.transformers_weight_conversion import (convert_peft_config_for_transformers,
                                                           get_model_conversion_mapping)

    assert parameters(convert_peft_config_for_transformers) == ["peft_config", "model", "conversions"]
    assert parameters(get_model_conversion_mapping)[0] == "model"


def test_llama_cpps_converter_has_the_hooks_finetune_gguf_wraps():
    """finetune.gguf wraps a converter instance's get_vocab_base_pre (a vocabulary it has no hash for) and set_vocab
    (the chat template without generation marks), and reads the architectures it converts from TEXT_MODEL_MAP."""
    from conversion import TEXT_MODEL_MAP, get_model_class
    from conversion.base import TextModel

    assert "LlamaForCausalLM" in TEXT_MODEL_MAP and issubclass(get_model_class("LlamaForCausalLM"), TextModel)
    assert parameters(TextModel.get_vocab_base_pre) == ["self", "tokenizer"]
    assert parameters(TextModel.set_vocab) == ["self"]
    assert "NotImplementedError" in inspect.getsource(TextModel.get_vocab_base_pre)
    from conversion.base import ModelBase

    assert {"dir_model", "ftype", "fname_out", "model_name"} <= set(parameters(ModelBase.__init__))


def test_llama_cpp_python_exposes_the_quantizer_and_the_output_silencer():
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    assert hasattr(params, "ftype") and hasattr(params, "nthread") and llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M == 15
    assert "disable" in parameters(suppress_stdout_stderr.__init__)


def test_trl_preference_trainers_internals_we_override():
    """finetune.trainer feeds TRL's DPO and ORPO trainers our tokenized pairs through these, finds DPO's frozen copy of
    a continued adapter under the name "ref", and fixes ORPO's cross-entropy from its forward's outputs."""
    from trl import DPOTrainer

    from finetune.trainer import orpo_classes

    assert parameters(DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    assert 'add_adapter("ref"' in inspect.getsource(DPOTrainer.__init__)
    orpo = orpo_classes()[1]
    assert parameters(orpo.tokenize_row) == ["self", "feature", "model"]
    assert parameters(orpo.concatenated_forward) == ["self", "model", "batch"]
    assert "return (chosen_logps, rejected_logps, chosen_logits, rejected_logits, chosen_nll_loss)" in \
        inspect.getsource(orpo.concatenated_forward)
