"""`eval`'s pieces without a model: the demo task metric, which variants are measured, the table."""

import pytest

from finetune.__main__ import main
from finetune.registry import load_config
from finetune.eval import Variant, table, variants
from finetune.scoring import number_words, words_to_number


@pytest.mark.parametrize("text, number", [
    ("three hundred forty seven", 347), ("Three hundred and forty-seven.", 347), ("zero", 0), ("nineteen", 19),
    ("nine hundred ninety nine", 999), ("one thousand two hundred", 1200), ("seven hundred", 700),
    ("three hundred forty seven!!", 347), ("", None), ("three hundred cats", None), ("hundred", None),
])
def test_words_to_number(text, number):
    assert words_to_number(text) == number


def test_the_demo_task_forgives_spelling_not_numbers():
    assert number_words("Three hundred and forty-seven.", "three hundred forty seven")
    assert not number_words("three hundred forty six", "three hundred forty seven")
    assert not number_words("three hundred forty seven and more words", "three hundred forty seven")


def test_what_eval_measures():
    trained = Variant("nf4", [], dtype="fp32")
    labels = [v.label for v in variants(load_config(["eval.quant=[int8,nf4]"]), trained)]
    # base and as trained first, then each precision once, the unquantized reference added to a comparison
    assert labels == ["base, nf4", "nf4", "int8", "none (fp32)"]
    cfg = load_config(["eval.quant=[nf4,none]", "quant.skip_modules=[lm_head,model.layers.0]"])
    assert [v.label for v in variants(cfg, trained)] == [
        "base, nf4", "nf4", "nf4 (lm_head, model.layers.0 unquantized)", "none (fp32)"]
    assert [v.label for v in variants(load_config([]), None)] == ["nf4"]  # a bare base: its own precision


def test_the_table_has_a_row_per_variant_and_skips_empty_columns():
    rows = [{"label": "nf4", "loss": 1.0, "perplexity": 2.718, "exact_match": 0.5, "weights_gb": 0.5,
             "tokens_per_second": 1234.0, "adapter": True},
            {"label": "none (bf16)", "loss": 0.9, "perplexity": 2.46, "exact_match": None, "weights_gb": 2.0,
             "tokens_per_second": 2000.0, "adapter": True}]
    lines = table({"rows": rows}).splitlines()
    assert lines[0].split() == ["loss", "ppl", "exact", "weights", "GB", "tok/s"]
    assert lines[1].split() == ["nf4", "1.0000", "2.72", "0.500", "0.5000", "1,234"]
    assert lines[2].split()[-4:] == ["2.46", "-", "2.0000", "2,000"]


def test_eval_help_names_both_forms(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m finetune eval run=RUN_DIR" in out and "python -m finetune eval recipe=NAME" in out
    assert "eval.quant" in out and "quant.skip_modules" in out
