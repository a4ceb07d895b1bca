"""`eval`: the demo run's adapter on its eval split at each precision, partial quantization, the lm-eval
harness on a task that reads a local file, and the figures in eval.json, the table, the chart, summary.json
and the model card."""

import json
import random
import shutil

import pytest
import torch

from finetune.__main__ import main
from finetune.config import ModelConfig, QuantConfig
from finetune.model import Device, load_base_model
from tests.helpers import ROOT

DEMO_MODEL = ROOT / "finetune" / "assets" / "tiny_llama"
DEMO_EVAL = ROOT / "finetune" / "assets" / "demo_data" / "eval.jsonl"
LABELS = ["base, nf4", "nf4", "nf4 (model.layers.0 unquantized)", "int8", "int8 (model.layers.0 unquantized)",
          "none (fp32)"]


def harness_task(folder):
    """An lm-eval multiple-choice task over local data: the demo's eval prompts, the right spelling among three."""
    rows = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines()]
    answers = [r["messages"][1]["content"] for r in rows]
    rng = random.Random(0)
    with open(folder / "words.jsonl", "w") as f:
        for r in rows[:24]:
            right = r["messages"][1]["content"]
            choices = [right, *rng.sample([a for a in answers if a != right], 2)]
            rng.shuffle(choices)
            f.write(json.dumps({"question": r["messages"][0]["content"], "choices": choices,
                                "label": choices.index(right)}) + "\n")
    (folder / "demo_words.yaml").write_text(
        "task: demo_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'words.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(demo_run, tmp_path_factory):
    """A copy of the demo run (eval writes into it), evaluated at every precision with layer 0 kept unquantized."""
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "exports"))
    tasks = harness_task(tmp_path_factory.mktemp("tasks"))
    code = main(["eval", f"run={run}", "eval.quant=[nf4,int8,none]", "quant.skip_modules=[model.layers.0]",
                 "data.eval_max_samples=16", "eval.max_new_tokens=12", "eval.harness_tasks=[demo_words]",
                 f"eval.harness_include={tasks}", "eval.harness_limit=12"])
    assert code == 0
    return run, json.loads((run / "eval.json").read_text())


def test_a_row_per_precision_with_every_measure(evaluated):
    run, result = evaluated
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == LABELS and result["trained"] == "nf4" and result["eval_rows"] == 16
    for r in rows.values():
        for key in ("loss", "perplexity", "exact_match", "task_accuracy", "agreement", "weights_gb", "tokens_per_second"):
            assert isinstance(r[key], float) and r[key] >= 0, (r["label"], key)
        assert r["perplexity"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6)
        assert len(r["answers"]) == 16
    assert rows["none (fp32)"]["agreement"] == 1.0  # the reference agrees with itself
    # The weights: 4-bit < 8-bit < unquantized, and keeping a layer unquantized costs memory.
    w = {k: r["weights_gb"] for k, r in rows.items()}
    assert w["nf4"] < w["nf4 (model.layers.0 unquantized)"] < w["none (fp32)"]
    assert w["nf4"] < w["int8"] < w["int8 (model.layers.0 unquantized)"] < w["none (fp32)"]
    # The quantized model's answers are the unquantized one's more often with the adapter than the untouched base's
    assert rows["nf4"]["agreement"] > rows["base, nf4"]["agreement"]
    assert (run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tuned_adapter_beats_the_base(evaluated):
    run, result = evaluated
    base, tuned = result["rows"][0], result["rows"][1]
    assert not base["adapter"] and tuned["adapter"]
    assert tuned["loss"] < base["loss"] - 3 and tuned["perplexity"] < base["perplexity"] / 20
    assert tuned["task_accuracy"] >= base["task_accuracy"] and tuned["exact_match"] >= base["exact_match"]


def test_harness_on_a_local_task(evaluated):
    _, result = evaluated
    base, tuned = result["rows"][0], result["rows"][1]
    for row in (base, tuned):
        assert row["harness"]["demo_words"]["samples"] == 12
        acc = row["harness"]["demo_words"]["acc"]
        assert acc * 12 == pytest.approx(round(acc * 12))  # the share of the 12 questions answered right
    assert tuned["harness"]["demo_words"]["acc"] > 1 / 3  # better than chance among three spellings
    assert all("harness" not in r for r in result["rows"][2:])  # the harness runs on base and as trained only


def test_summary_and_model_card_carry_the_figures(evaluated):
    run, result = evaluated
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert summary["base"]["label"] == "base, nf4" and summary["tuned"]["label"] == "nf4"
    assert summary["tuned_unquantized"]["label"] == "none (fp32)"
    assert summary["tuned"]["loss"] == result["rows"][1]["loss"]
    card = (run / "adapter" / "README.md").read_text()
    assert "## Evaluation" in card and "| nf4 (as trained) |" in card and "| none (fp32) |" in card
    assert "| base, nf4 | demo_words | acc |" in card
    assert "## Evaluation" in (run / "merged" / "README.md").read_text()


@pytest.mark.slow
def test_skip_modules_really_stays_unquantized():
    cpu = Device("cpu", "cpu", True, "fp32", torch.float32)
    for method, cls in (("nf4", "Linear4bit"), ("int8", "Linear8bitLt")):
        model = load_base_model(ModelConfig(name_or_path=str(DEMO_MODEL)),
                                QuantConfig(method=method, double_quant=method == "nf4",
                                            skip_modules=["model.layers.0", "model.layers.3.mlp"]), cpu)
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))}
        kept = {n for n, k in kinds.items() if k == "Linear"}
        assert kept == {n for n in kinds if n.startswith(("model.layers.0.", "model.layers.3.mlp.")) or n == "lm_head"}
        assert all(kinds[n] == cls for n in kinds if n not in kept)
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # not packed


@pytest.mark.slow
def test_eval_of_a_bare_base_from_a_recipe(tmp_path, capsys):
    out = tmp_path / "base_eval"
    assert main(["eval", "recipe=tiny_qlora", "data.eval_max_samples=8", "eval.max_new_tokens=8",
                 f"output_dir={out}", "eval.quant=[nf4,none]"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["nf4", "none (fp32)"] and result["adapter"] is None
    assert not any(r["adapter"] for r in result["rows"]) and result["rows"][1]["agreement"] == 1.0
    printed = capsys.readouterr().out
    assert "none (fp32)" in printed and f"eval.json and eval.png in {out}" in printed


@pytest.mark.parametrize("args, message", [
    (["quant.skip_modules=[model.layer.0]"], "quant.skip_modules: model.layer.0 matches no linear layer"),
    (["eval.quant=[nf4,fp8]"], "eval.quant=fp8 is not allowed: choose one of nf4, int8, none"),
    (["eval.harness_tasks=[no_such_task]", "eval.harness_include=/nonexistent"],
     "eval.harness_include=/nonexistent: no such folder"),
])
def test_eval_user_errors(demo_run, args, message, capsys):
    assert main(["eval", f"run={demo_run}", "data.eval_max_samples=2", "eval.max_new_tokens=2", *args]) == 2
    assert message in capsys.readouterr().err


def test_harness_data_out_of_reach_is_said_before_anything_is_evaluated(demo_run, tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    import finetune.eval as eval_module

    (tmp_path / "far.yaml").write_text(
        "task: far_task\ndataset_path: nonexistent-org/no-such-data\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n')
    for module in (datasets.config, huggingface_hub.constants):  # offline, as the audit ran it
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    measured = []
    monkeypatch.setattr(eval_module, "measure", lambda *a, **k: measured.append(a))
    code = main(["eval", f"run={demo_run}", "eval.harness_tasks=[far_task]", f"eval.harness_include={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.harness_tasks: the data of far_task could not be loaded" in err, err
    assert "Traceback" not in err and measured == []
