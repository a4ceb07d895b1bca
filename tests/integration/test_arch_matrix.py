"""The architecture matrix: a tiny random-weight replica of each model family users fine-tune today
(tests/arch_families.py), with its real chat template and special tokens, through the whole pipeline on the
installed transformers, PEFT, TRL and bitsandbytes: the masks token by token, a QLoRA run whose loss falls, the
adapter in plain PEFT, a merge that passes its fidelity check, generation that stops at the template's end-of-turn
token, and `plan`'s parameter count against the built model. The mixtures of experts add which weights bitsandbytes
quantizes and which LoRA adapts."""

import json

import pytest

from finetune.data import formats
from finetune.data.templates import use_end_of_turn
from finetune.data.tokenize import tokenize_row
from tests.arch_families import FAMILIES, build_family, family_tokenizer
from tests.helpers import run_main, tiny_overrides, trained_runs
from tests.unit.test_chat_masks import CONVERSATION, REPLIES

# Six steps teach every replica to answer "yes" and stop. The replicas' weights are drawn wider than a real
# model's (initializer_range 0.2), so that a few LoRA steps can move a random head's argmax.
STEPS = ["train.max_steps=6", "train.learning_rate=1e-2", "data.max_length=512", "data.eval_fraction=0.1",
         "train.eval_batch_size=16"]  # the 7 eval rows in one batch: the Trainer's eval loss is then token-weighted
SYSTEM = {"role": "system", "content": "Answer yes or no."}  # (SmolLM3's default one is 1,100 characters)
# gpt-oss trains its fused experts too (PEFT's ParamWrapper), so that the merge and `plan` cover them
EXTRA = {"gpt_oss": ["lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]}
FIRST_OF_EOT = {family.eot: name for name, family in reversed(FAMILIES.items())}  # the first family of each


@pytest.mark.parametrize("name", FAMILIES)
def test_each_reply_and_its_end_of_turn_token_are_the_trained_tokens(name):
    """A three-turn conversation with a system prompt, through the family's tokenizer as training prepares it (its
    end-of-turn token made the EOS): exactly each reply's tokens and the end-of-turn token are trained."""
    family, tok = FAMILIES[name], family_tokenizer(name)
    use_end_of_turn(tok)
    assert tok.eos_token == family.eot
    conversation = formats.fold(list(CONVERSATION)) if family.fold_system else CONVERSATION
    runs = trained_runs(tokenize_row({"messages": conversation}, tok, train_on_inputs=False))
    decoded = [tok.decode(r) for r in runs]
    assert [d.removeprefix(family.reply_sep) for d in decoded] == [r + family.eot for r in REPLIES], decoded
    assert all(r[-1] == tok.convert_tokens_to_ids(family.eot) for r in runs)


@pytest.fixture(scope="module")
def yes_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("yes") / "yes.jsonl"
    path.write_text("".join(json.dumps({"messages": [SYSTEM, {"role": "user", "content": f"Is {i} red?"},
                                                     {"role": "assistant", "content": "yes"}]}) + "\n"
                            for i in range(64)))
    return path


def family_run(name, model, data, out):
    family = FAMILIES[name]
    fold = ["data.system_prompt=fold"] if family.fold_system else []
    return run_main(*tiny_overrides(model, data, out, *STEPS, "export=merged", "export.merge_base=dequantized",
                                    *fold, *EXTRA.get(name, [])), wandb_mode=None)


@pytest.fixture(scope="module")
def trained(yes_data, tmp_path_factory):
    """trained(NAME): (the replica's folder, its run directory), trained once in this module."""
    runs = {}

    def run(name):
        if name not in runs:
            model = build_family(name, tmp_path_factory.mktemp(name) / name)
            out = tmp_path_factory.mktemp(f"{name}_run") / "run"
            result = family_run(name, model, yes_data, out)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[name] = model, out
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_trains_merges_loads_in_peft_and_stops_at_the_end_of_turn(name, trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import ModelConfig
    from finetune.data.masks import inference_prompt
    from finetune.plan import load_arch

    model, out = trained(name)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    assert losses[-1] < losses[0] / 2 and summary["eval_loss"] < summary["eval_loss_base"] / 10
    fidelity = summary["merge_fidelity"]["dequantized"]
    assert fidelity["mean_kl"] < 0.05 and (out / "merged" / "model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    assert load_arch(ModelConfig(name_or_path=str(model))).params == sum(p.numel() for p in base.parameters())
    tuned = PeftModel.from_pretrained(base, out / "adapter")  # plain PEFT, as another tool would load it
    trained_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b)

    # the merged model in plain transformers stops at the end-of-turn token by its generation_config.json alone
    tok = AutoTokenizer.from_pretrained(out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    conversation = [SYSTEM, {"role": "user", "content": "Is 5 red?"}]
    if FAMILIES[name].fold_system:
        conversation = formats.fold(conversation)
    prompt = tok(inference_prompt(tok, conversation), add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8)[0, prompt.shape[1]:]
    assert new[-1] == tok.convert_tokens_to_ids(FAMILIES[name].eot) and tok.decode(new[:-1]) == "yes"
    if FIRST_OF_EOT[FAMILIES[name].eot] == name:  # `generate` itself: once per end-of-turn token (suite time)
        answer = run_main("generate", f"run={out}", "prompt=Is 5 red?", f"system={SYSTEM['content']}", "max_new_tokens=8")
        assert answer.returncode == 0, answer.stderr[-2000:]
        assert "yes" in answer.stdout and "stopped at EOS" in answer.stdout, answer.stdout


@pytest.mark.slow
def test_eval_measures_the_loss_training_measured(trained):
    _, out = trained("llama3_1")
    result = run_main("eval", f"run={out}", "eval.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    trained_loss = json.loads((out / "summary.json").read_text())["eval_loss"]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    as_trained = next(r for r in rows if r["label"] == "nf4")
    assert as_trained["loss_tokens"] > 0 and as_trained["loss"] == pytest.approx(trained_loss, rel=1e-3)
    base = next(r for r in rows if not r["adapter"])
    assert base["loss"] > as_trained["loss"]  # six steps of training are measured, not a 0.0000


@pytest.mark.slow
def test_the_end_of_turn_token_is_the_eos_of_every_export(trained):
    from transformers import AutoTokenizer, GenerationConfig

    _, out = trained("llama3_1")
    for folder in (out / "adapter", out / "merged"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token != "<|eot_id|>"
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chat_template"] == "tokenizer" and summary["reasoning"] is False


@pytest.mark.slow
def test_generate_formats_the_prompt_as_training_did(trained, monkeypatch):
    """generate builds the prompt with finetune.data.masks.inference_prompt, the context training gave replies."""
    from finetune.data import masks

    _, out = trained("llama3_1")
    prompts = []
    real = masks.inference_prompt
    monkeypatch.setattr(masks, "inference_prompt", lambda *a, **k: prompts.append(real(*a, **k)) or prompts[-1])
    result = run_main("generate", f"run={out}", "prompt=Is 3 red?", "max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert prompts == ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                       "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                       "Is 3 red?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]


# What bitsandbytes quantizes in each mixture of experts: its nn.Linear layers only. transformers 5 stores the experts
# as fused 3-D parameters and the router as a module of its own, so both stay in the compute dtype. LoRA's all-linear
# adapts the quantized layers; on Qwen3-MoE (and the other mixtures transformers converts from per-expert layers, such
# as Mixtral) PEFT maps it to the fused experts and the router's weight too, adapted as parameters (its ParamWrapper).
# lora.target_parameters adds the experts anywhere.
MOE = {  # (the NF4 layers, the router, what all-linear adapts besides the NF4 layers)
    "qwen3_5_moe": ({"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj", "k_proj", "v_proj",
                     "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"}, "mlp.gate", set()),
    "qwen3_moe": ({"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp.gate", {"experts", "gate"}),
    "gpt_oss": ({"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp.router", set()),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("name", MOE)
def test_a_mixture_of_experts_quantizes_its_linear_layers_and_adapts_its_experts_on_request(name, tmp_path):
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model

    from finetune.config import LoraConfig, ModelConfig, QuantConfig, TrainConfig
    from finetune.lora import build_peft_config, count_parameters
    from finetune.model import detect_device, load_base_model
    from finetune.plan import load_arch, lora_shapes

    quantized, router, by_peft = MOE[name]
    cfg, quant = ModelConfig(name_or_path=str(build_family(name, tmp_path / name))), QuantConfig()
    model = load_base_model(cfg, quant, detect_device(TrainConfig(), quant, cfg))
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {n.rsplit(".", 1)[-1] for n in four_bit} == quantized
    params = dict(model.named_parameters())
    for layer in range(2):
        assert all(params[f"model.layers.{layer}.{e}"].dtype == torch.float32 for e in EXPERTS)  # compute dtype on CPU
        assert not any(n.startswith(f"model.layers.{layer}.{router}") for n in four_bit)

    arch = load_arch(cfg)  # plan counts what bitsandbytes quantizes, and the rest in 16/32-bit
    assert list(arch.fused) == EXPERTS and arch.active_experts == 0.5
    assert arch.quantized_params == sum(m.weight.quant_state.shape.numel() for m in four_bit.values())
    assert arch.params == count_parameters(model)[1]

    for lora, extra in ((LoraConfig(r=4, dropout=0.0), by_peft), (LoraConfig(r=4, dropout=0.0, target_parameters=EXPERTS),
                                                                    by_peft | {"experts"})):
        peft_model = get_peft_model(load_base_model(cfg, quant, detect_device(TrainConfig(), quant, cfg)),
                                    build_peft_config(lora))
        adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
        assert {n.rsplit(".", 1)[-1] for n in adapted} - {"base_layer"} == quantized | extra
        plan = sum(a * b for a, b in lora_shapes(load_arch(cfg, lora), lora, 4))  # plan's count of the adapter
        assert count_parameters(peft_model)[0] == plan


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return build_family("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "gpt_oss")


FUSED = "mlp.experts.gate_up_proj, mlp.experts.down_proj"


@pytest.mark.parametrize("override, said", [
    ("lora.target_parameters=[mlp.experts.up_proj]", f"mlp.experts.up_proj names no weight of {{}}. Its fused expert "
                                                     f"weights: {FUSED}."),
    ("lora.target_modules=[experts]", f"lora.target_modules: experts is GptOssExperts in {{}}, not a linear layer LoRA "
                                      f"can adapt. Its linear layers: q_proj, k_proj, v_proj, o_proj (or all-linear). "
                                      f"Its fused expert weights take lora.target_parameters=[{FUSED}]."),
    ("model.attn_implementation=sdpa", "model.attn_implementation=sdpa: GptOssForCausalLM has no SDPA attention"),
    ("lora.target_parameters=[mlp.experts.down_proj] lora.dropout=0.05", "ParamWrapper, which has no dropout or DoRA: set lora.dropout=0"),
])
def test_a_target_or_setting_the_mixture_of_experts_lacks_is_one_message(gpt_oss, yes_data, tmp_path, override, said):
    result = run_main(*tiny_overrides(gpt_oss, yes_data, tmp_path / "run", *override.split()), wandb_mode=None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert said.format(gpt_oss) in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_dropout_where_peft_adapts_a_mixtures_experts_by_itself_is_one_message(yes_data, tmp_path):
    """all-linear on Qwen3-MoE: PEFT adapts the fused experts and the router as parameters, which take no dropout."""
    model = build_family("qwen3_moe", tmp_path / "qwen3_moe")
    result = run_main(*tiny_overrides(model, yes_data, tmp_path / "run", "lora.dropout=0.05"), wandb_mode=None)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert ("PEFT adapts its fused experts and router as parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj, "
            "mlp.gate.weight), which takes no dropout or DoRA. Set lora.dropout=0") in result.stderr


def test_a_checkpoint_shipped_in_another_quantization_is_refused_for_bitsandbytes(gpt_oss, yes_data, tmp_path):
    """gpt-oss ships its experts in MXFP4: bitsandbytes cannot quantize them again; quant=none dequantizes them."""
    import shutil

    model = shutil.copytree(gpt_oss, tmp_path / "mxfp4")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}}))
    result = run_main(*tiny_overrides(model, yes_data, tmp_path / "run"), wandb_mode=None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ships weights already quantized with mxfp4" in result.stderr and "Use quant=none" in result.stderr


def test_plan_counts_a_vision_language_model_whole_and_reads_its_language_model_shape(tmp_path):
    """Gemma 3 from 4B up is a vision-language model: AutoModelForCausalLM loads it whole (the vision tower too), and
    plan counts what is loaded, with the language model's width, depth and vocabulary."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from finetune.config import ModelConfig
    from finetune.plan import load_arch

    config = Gemma3Config(text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    arch = load_arch(ModelConfig(name_or_path=str(tmp_path)))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert (arch.hidden, arch.layers, arch.vocab) == (64, 2, 300)


def test_quant_none_dequantizes_a_checkpoint_shipped_in_mxfp4(gpt_oss, tmp_path, monkeypatch):
    """gpt-oss with quant=none: transformers is asked to dequantize its MXFP4 experts (Mxfp4Config(dequantize=True)), so
    they train in 16-bit on every GPU; another checkpoint gets no quantization config at all. (A real MXFP4 checkpoint
    cannot be written here: transformers quantizes to MXFP4 only on a GPU, so this checks what is asked of it.)"""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config import ModelConfig, QuantConfig, TrainConfig
    from finetune.model import detect_device, load_base_model

    model = shutil.copytree(gpt_oss, tmp_path / "mxfp4")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}}))
    asked = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", 
                        lambda path, **kw: asked.append(kw["quantization_config"]) or torch.nn.Module())
    quant = QuantConfig(method="none")
    for folder in (model, gpt_oss):
        cfg = ModelConfig(name_or_path=str(folder))
        load_base_model(cfg, quant, detect_device(TrainConfig(), quant, cfg))
    assert type(asked[0]).__name__ == "Mxfp4Config" and asked[0].dequantize and asked[1] is None


@pytest.mark.slow
def test_healing_restores_the_exact_match_pruning_took(trained, tmp_path):
    """prune.heal=sft on the Llama 3.1 replica taught to answer "yes": dropping one of its two layers loses the answer,
    and the healing run (the recipe's own 6 steps, LoRA on the pruned model) brings it back."""
    _, out = trained("llama3_1")
    pruned = tmp_path / "pruned"
    result = run_main("prune", f"run={out}", "prune.layers=1", "prune.heal=sft", f"prune.output_dir={pruned}",
                      "eval.exact_match_samples=7", wandb_mode=None)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((pruned / "prune.json").read_text())
    healed = json.loads((pruned / "heal" / "summary.json").read_text())
    assert report["before"]["exact_match"] == 1 and report["after"]["exact_match"] < 0.5 and healed["exact_match"] == 1
    # side by side: the healed model's GPU-hours in all are the run's training, the pruning and the healing
    compared = run_main("eval", f"run={out}", f"compare={pruned},{pruned / 'heal'}", "plan.gpu=l4", wandb_mode=None)
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = {r["kind"]: r for r in json.loads((out / "compare" / "eval.json").read_text())["rows"]}
    assert list(rows) == ["original", "pruned", "healed"] and rows["healed"]["exact_match"] == 1 > rows["pruned"]["exact_match"]
    assert rows["healed"]["gpu_hours_total"] == pytest.approx(
        rows["original"]["gpu_hours"] + rows["pruned"]["gpu_hours"] + rows["healed"]["gpu_hours"])
