"""GGUF export (export.gguf, export.gguf_adapter) with llama.cpp's own converter, quantizer and runtime: the files load
in llama.cpp, answer as the model as trained does and stop at EOS, their fidelity is measured and reported, the
Ollama Modelfile's template (rendered by Go) leads llama.cpp to the same answer, the adapter's GGUF on the base's GGUF
is the tuned model, `eval` gains GGUF rows, K-quants quantize a 256-wide replica, `publish` uploads the files, and
every user error is one message.

The demo's adapter here is the full demo's (`python -m finetune`, 570 steps: tests/fixtures/demo_adapter/), on a copy
of the session's shortened demo run: the GGUF path itself runs in CI, the six-minute training does not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from finetune import gguf
from finetune.__main__ import main
from finetune.data.masks import inference_prompt
from tests.arch_families import SMALL, build_family
from tests.helpers import ROOT, go_render, modelfile_template, run_main, tiny_overrides, write_chat_data
from tests.hub_standin import HubStandIn
from tests.integration.test_artifacts import TOKEN, hub_as_configured_here, hub_env  # noqa: F401 (autouse: the Hub
#                                                                                     stand-in's settings in-process)

pytestmark = pytest.mark.slow

DEMO_ADAPTER = ROOT / "tests" / "fixtures" / "demo_adapter"
DEMO_MODEL = ROOT / "finetune" / "assets" / "tiny_llama"
ASK = [{"role": "user", "content": "Write 512 in words."}]


# export.max_kl between the merge's KL (7e-4 nats/token) and q4_k_m's (1.6e-3): q4_k_m is over it
MAX_KL = 0.001


@pytest.fixture(scope="module")
def gguf_pair(demo_run, tmp_path_factory):
    """A copy of the demo run with the full demo's adapter, exported again with f16, q8_0 and q4_k_m GGUFs and the
    adapter's, q4_k_m further from the model as trained than export.max_kl. Returns (run, stderr)."""
    run = tmp_path_factory.mktemp("gguf") / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "exports"))
    shutil.rmtree(run / "adapter")
    shutil.copytree(DEMO_ADAPTER, run / "adapter")
    result = run_main("export", f"run={run}", "export.gguf=[f16,q8_0,q4_k_m]", "export.gguf_adapter=true",
                      f"export.max_kl={MAX_KL}", "export.merge_base=dequantized")
    assert result.returncode == 2, result.stderr[-3000:]  # q4_k_m: written, flagged, said at the end
    return run, result.stderr


@pytest.fixture(scope="module")
def gguf_run(gguf_pair):
    return gguf_pair[0]


def test_a_file_further_than_max_kl_is_written_flagged_and_said_plainly(gguf_pair):
    run, stderr = gguf_pair
    q4 = json.loads((run / "summary.json").read_text())["gguf"]["files"]["q4_k_m"]
    assert q4["mean_kl"] > MAX_KL and not q4["within_max_kl"] and (run / "gguf" / q4["file"]).is_file()
    assert f"export.max_kl={MAX_KL} nats per token: q4_k_m (mean KL {q4['mean_kl']:.3g})" in stderr
    assert "Traceback" not in stderr
    # the Modelfile runs the smallest file within export.max_kl
    assert (run / "gguf" / "Modelfile").read_text().startswith("FROM ./tiny_qlora-q8_0.gguf\n")


def test_f16_and_q8_0_are_written_loaded_by_llama_cpp_and_measured(gguf_run):
    summary = json.loads((gguf_run / "summary.json").read_text())
    figures = summary["gguf"]
    assert figures == json.loads((gguf_run / "gguf" / "fidelity.json").read_text())
    f16, q8 = figures["files"]["f16"], figures["files"]["q8_0"]
    assert (gguf_run / "gguf" / f16["file"]).is_file() and (gguf_run / "gguf" / q8["file"]).is_file()
    assert 0.45 < q8["size_gb"] / f16["size_gb"] < 0.6  # 8.5 bits a weight against 16
    for f in (f16, q8):
        assert 0 <= f["mean_kl"] < MAX_KL and f["within_max_kl"]
        assert f["tokenizer_matches"] and f["stopped_at_eos"] == 1.0 and f["tokens_per_second"] > 0
        assert f["agreement"] == 1.0 and f["exact_match"] >= 0.75  # llama.cpp answers as the trained model does
    assert f16["mean_kl"] < q8["mean_kl"]  # 8-bit rounding costs more than 16-bit
    from gguf import GGUFReader

    template = GGUFReader(gguf_run / "gguf" / f16["file"]).fields["tokenizer.chat_template"]
    assert "{% if true %}" in bytes(template.parts[-1]).decode()  # for {% generation %}: llama.cpp's jinja refuses it
    assert "endgeneration" not in bytes(template.parts[-1]).decode()
    assert abs(f16["eval_loss"] - summary["merge_reference_eval_loss"]) < 0.02
    card = (gguf_run / "merged" / "README.md").read_text()
    assert "## GGUF files" in card and f"`{q8['file']}`" in card and f"{q8['mean_kl']:.3g}" in card
    assert "`tiny_qlora-lora-f16.gguf` is the adapter alone" in card


def test_write_512_in_words_through_llama_cpp_and_the_ollama_template(gguf_run, tmp_path):
    from transformers import AutoTokenizer

    figures = json.loads((gguf_run / "summary.json").read_text())["gguf"]
    q8 = gguf_run / "gguf" / figures["files"]["q8_0"]["file"]
    tokenizer = AutoTokenizer.from_pretrained(gguf_run / "merged")
    llm = gguf.load(q8, 256)
    try:
        text, n, stopped, _ = gguf.answer(llm, inference_prompt(tokenizer, ASK), 40)
        assert (text.strip(), stopped) == ("five hundred twelve", True) and n < 40
        # Ollama: the Modelfile's TEMPLATE rendered by Go, tokenized by llama.cpp with the BOS it adds itself
        modelfile = (gguf_run / "gguf" / "Modelfile").read_text()
        assert 'PARAMETER stop "</s>"' in modelfile
        prompt = go_render([{"template": modelfile_template(modelfile), "messages": ASK}], tmp_path)[0]["text"]
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        assert ids == tokenizer(inference_prompt(tokenizer, ASK), add_special_tokens=False)["input_ids"]
        llm.reset()
        out = llm.create_completion(ids, max_tokens=40, temperature=0.0, top_k=1, repeat_penalty=1.0)
        assert out["choices"][0]["text"].strip() == "five hundred twelve"
        assert out["choices"][0]["finish_reason"] == "stop"
    finally:
        llm.close()
    assert (gguf_run / "gguf" / "template").read_text() == modelfile_template(modelfile)
    assert json.loads((gguf_run / "gguf" / "params").read_text()) == {"stop": ["</s>"]}


def test_publish_uploads_the_gguf_files_where_ollama_finds_them(gguf_run):
    from huggingface_hub import ModelCard

    with HubStandIn(tokens={TOKEN: "alice"}) as hub:
        result = run_main("publish", f"run={gguf_run}", "hub.repo_id=alice/tiny-gguf", "hub.model=merged",
                          "hub.gguf=true", env=hub_env(hub))
    assert result.returncode == 0, result.stderr[-2000:]
    files = hub.repos["alice/tiny-gguf"]["commits"][0]["files"]
    local = gguf_run / "gguf"
    assert files["tiny_qlora-q8_0.gguf"] == (local / "tiny_qlora-q8_0.gguf").read_bytes()
    assert {"tiny_qlora-f16.gguf", "tiny_qlora-lora-f16.gguf", "Modelfile", "template", "params",
            "gguf_fidelity.json", "model.safetensors"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert {"gguf", "llama.cpp", "q8_0", "q4_k_m"} <= set(card.data.tags)
    assert "ollama run hf.co/alice/tiny-gguf:Q8_0" in card.text


def test_the_adapter_gguf_on_the_base_gguf_is_the_tuned_model(gguf_run, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    base = gguf.write_files(DEMO_MODEL, tmp_path, "base", ["f16"], None)["f16"]
    merged = gguf_run / "gguf" / json.loads((gguf_run / "summary.json").read_text())["gguf"]["files"]["f16"]["file"]
    lora = gguf_run / "gguf" / "tiny_qlora-lora-f16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_run / "merged")
    ids = tokenizer(inference_prompt(tokenizer, ASK) + "five hundred twelve", add_special_tokens=False)["input_ids"]
    sample = [{"input_ids": torch.tensor([ids])}]

    def logits_of(path, **kwargs):
        llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, **kwargs)
        try:
            return gguf.logits(llm, sample)[0]
        finally:
            llm.close()

    def kl(p, q):
        return torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean().item()

    tuned, with_lora, untouched = logits_of(merged), logits_of(base, lora_path=str(lora)), logits_of(base)
    assert kl(tuned, with_lora) < 0.05 < 1.0 < kl(tuned, untouched)


def test_eval_gains_gguf_rows(gguf_run, capsys):
    code = main(["eval", f"run={gguf_run}", "eval.quant=[gguf:q8_0,gguf:q4_0]", "data.eval_max_samples=4"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = {r["label"]: r for r in json.loads((gguf_run / "eval.json").read_text())["rows"]}
    none, q8, q4 = rows["none (fp32)"], rows["gguf:q8_0"], rows["gguf:q4_0"]
    assert (gguf_run / "gguf" / "tiny_qlora-q4_0.gguf").is_file()  # made from merged/ for the comparison
    assert abs(q8["loss"] - none["loss"]) < 0.02 * none["loss"] and q8["agreement"] >= 0.75
    assert q4["weights_gb"] < q8["weights_gb"] and q8["tokens_per_second"] > 0
    assert "gguf:q4_0" in capsys.readouterr().out  # the table


def test_k_quants_on_a_replica_256_wide(tmp_path):
    """K-quants pack 256-weight super-blocks: a 256-wide replica takes them without fallback; each level costs more
    KL than the one above it."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoModelForCausalLM

    wide = {**SMALL, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "initializer_range": 0.02}
    model_dir = build_family("llama3_1", tmp_path / "model", config=wide)
    files = gguf.write_files(model_dir, tmp_path, "wide", ["f16", "q6_k", "q4_k_m"], None)
    types = {t.name: t.tensor_type for t in GGUFReader(files["q4_k_m"]).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_K
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q6_K  # q4_k_m keeps some at 6 bits
    assert {t.tensor_type for t in GGUFReader(files["q6_k"]).tensors if "blk" in t.name and t.name.endswith(
        "attn_q.weight")} == {GGMLQuantizationType.Q6_K}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sample = [{"input_ids": torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(0))}]
    with torch.no_grad():
        reference = [model(input_ids=sample[0]["input_ids"]).logits]
    kls = []
    for level in ("f16", "q6_k", "q4_k_m"):
        llm = gguf.load(files[level], 64)
        try:
            logits = gguf.logits(llm, sample)
        finally:
            llm.close()
        kls.append(torch.nn.functional.kl_div(logits[0].log_softmax(-1), reference[0].log_softmax(-1),
                                              log_target=True, reduction="none").sum(-1).mean().item())
    assert kls[0] < kls[1] < kls[2] < 0.01, kls
    print("KL to the fp32 model: f16 %.3g, q6_k %.3g, q4_k_m %.3g" % tuple(kls))
    assert files["q4_k_m"].stat().st_size < files["q6_k"].stat().st_size < files["f16"].stat().st_size


# ---- errors -------------------------------------------------------------------------------------

def test_an_architecture_llama_cpp_cannot_convert_is_said_before_training(tmp_path, capsys):
    model = build_family("ministral", tmp_path / "ministral")  # transformers' MinistralForCausalLM
    data = write_chat_data(tmp_path / "chat.jsonl", 24)
    result = run_main(*tiny_overrides(model, data, tmp_path / "run", "export=merged", "export.gguf=[q8_0]"))
    assert result.returncode == 2
    assert "cannot convert MinistralForCausalLM" in result.stderr and "LlamaForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, architecture", [("qlora_llama3_1_8b", "LlamaForCausalLM"),
                                                   ("qlora_gemma3_12b", "Gemma3ForConditionalGeneration")])
def test_a_recipes_base_is_checked_by_the_class_merged_will_name(recipe, architecture):
    """A shipped preset's config has no `architectures`: the check reads the skeleton's class instead."""
    from finetune.registry import load_config

    cfg = load_config([f"recipe={recipe}", "export=merged", "export.gguf=[q8_0]"])
    assert gguf.check_export(cfg.model, cfg.export) == architecture


@pytest.mark.parametrize("args, message", [
    (["export.gguf=[q4_k_xl]"], "export.gguf=q4_k_xl is not allowed: choose one of f32, f16, bf16, q8_0"),
    (["export=adapter", "export.gguf=[q8_0]"], "export.gguf=['q8_0'] converts merged/, which export.merge=false"),
    (["hub=push", "hub.repo_id=me/x", "hub.gguf=true"], "hub.gguf=true uploads gguf/, which the run writes only"),
])
def test_gguf_settings_that_cannot_work_are_one_message(args, message, capsys):
    assert main(["plan", "recipe=tiny_qlora", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_without_the_extra_one_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"pip install 'finetune\[gguf\]'"):
        gguf.require()


def test_the_converter_names_a_pre_tokenizer_it_has_no_hash_for_by_its_rules(tmp_path):
    assert gguf.pre_tokenizer_by_rules(DEMO_MODEL / "tokenizer.json") == "starcoder"  # digits split, then GPT-2's
    build_family("qwen3", tmp_path / "qwen3")
    assert gguf.pre_tokenizer_by_rules(tmp_path / "qwen3" / "tokenizer.json") == "gpt-2"
    (tmp_path / "odd.json").write_text(json.dumps({"pre_tokenizer": {"type": "Whitespace"}}))
    assert gguf.pre_tokenizer_by_rules(tmp_path / "odd.json") is None


def test_generation_marks_become_always_true_blocks():
    marked = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert gguf.inference_template(marked) == ("{% for m in messages %}{%- if true -%}{{ m.content }}{% endif %}"
                                               "{% endfor %}")
