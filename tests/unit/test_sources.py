"""Several sources mixed by weight, the Hub code path on local files, and the `data` verb."""

import json
from collections import Counter

import pytest

from finetune.config import Columns, DataConfig, SourceConfig
from finetune.data import _read_hub, load_splits
from finetune.errors import UserError


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chats(tag, n):
    return [{"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": tag}]}
            for i in range(n)]


def test_sources_are_mixed_by_weight_and_held_out_separately(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", chats("a", 1000))
    b = tmp_path / "b.csv"
    b.write_text("question,answer\n" + "".join(f"b {i},b\n" for i in range(200)))
    cfg = DataConfig(eval_fraction=0.1, eval_max_samples=None, sources=[
        SourceConfig(path=a, weight=3.0),
        SourceConfig(path=str(b), weight=1.0, format="instruction", columns=Columns(instruction="question", output="answer")),
    ])
    splits = load_splits(cfg, seed=0)
    assert splits.sources == {f"{a} (weight 3)": 900, f"{b} (weight 1)": 180}
    tags = Counter(m[1]["content"] for m in splits.train["messages"])
    assert tags["a"] >= 900 and tags["b"] > 180  # every row is used; the smaller source repeats...
    assert abs(tags["a"] / sum(tags.values()) - 0.75) < 0.04  # ...and the mix follows the weights (~1300 draws)
    assert len(splits.eval) == 100 + 20
    held_out = set(splits.eval["messages"][i][0]["content"] for i in range(len(splits.eval)))
    assert not held_out & set(m[0]["content"] for m in splits.train["messages"])
    again = load_splits(cfg, seed=0)
    assert again.train["messages"] == splits.train["messages"]  # deterministic by seed


def test_sources_must_train_the_same_way(tmp_path):
    cfg = DataConfig(eval_fraction=0, sources=[SourceConfig(path=jsonl(tmp_path / "a.jsonl", chats("a", 3))),
                                               SourceConfig(path=jsonl(tmp_path / "t.jsonl", [{"text": "x"}] * 3))])
    with pytest.raises(UserError, match="data.sources mix conversations and text"):
        load_splits(cfg, seed=0)


def test_the_hub_code_path_reads_a_dataset_folder_with_splits(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    jsonl(folder / "train.jsonl", chats("t", 4))
    jsonl(folder / "test.jsonl", chats("e", 2))
    cfg = DataConfig(path=str(folder))
    rows = _read_hub("data.path", str(folder), cfg, "test")
    assert len(rows.rows) == 2 and rows.where[1] == f"{folder}[test] row 1"
    with pytest.raises(UserError, match=r"\(split nope\): could not be loaded"):
        _read_hub("data.path", str(folder), cfg, "nope")


def test_the_data_verb_reports_and_marks_the_trained_tokens(cli):
    result = cli("data", "train.seed=3")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "format: messages" in out and "train: 900 rows" in out and "eval: 100 rows" in out
    assert "tokens per row: p50" in out and "trained" in out
    assert out.strip().endswith("</s>]]")  # the reply and its EOS are the trained tokens, marked
    # the trained tokens counted are exactly the replies and their EOS, counted here without the template's marks
    from transformers import AutoTokenizer

    from tests.helpers import ROOT

    tok = AutoTokenizer.from_pretrained(ROOT / "finetune" / "assets" / "tiny_llama")
    rows = [json.loads(line) for line in (ROOT / "finetune" / "assets" / "demo_data" / "train.jsonl").read_text().splitlines()]
    replies = sum(len(tok(m["content"] + tok.eos_token, add_special_tokens=False)["input_ids"])
                  for r in rows for m in r["messages"] if m["role"] == "assistant")
    line = next(line for line in out.splitlines() if line.startswith("train: 900 rows"))
    assert f" tokens, {replies} of them trained" in line


def test_the_data_verb_exits_2_on_bad_data(cli, tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    result = cli("data", f"data.path={bad}", "data.eval_path=null")
    assert result.returncode == 2 and "has no assistant message" in result.stderr and "Traceback" not in result.stderr


def test_trained_tokens_are_green_on_a_terminal_and_bracketed_otherwise(tiny_model):
    from transformers import AutoTokenizer

    from finetune.data.report import histogram, percentiles, render

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("the red fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = [-100] * 2 + ids[2:]
    plain = render(tok, ids, labels, color=False)
    assert plain.endswith("]]") and "[[" in plain and plain.replace("[[", "").replace("]]", "") == tok.decode(ids)
    colored = render(tok, ids, labels, color=True)
    assert "\033[1;32m" in colored and colored.endswith("\033[0m") and "[[" not in colored
    assert percentiles([1, 2, 3, 4]) == {50: 2, 90: 4, 99: 4, 100: 4}
    assert sum(int(line.split()[-1]) for line in histogram([5, 6, 7, 30], max_length=10)
               if not line.endswith("max_length")) == 3  # rows within max_length


def test_the_data_verb_shows_every_length_before_a_drop(cli, tmp_path):
    """Rows over data.max_length are counted in the lengths shown, and the report says training would stop."""
    rows = [json.dumps({"text": " ".join(["fox"] * n)}) for n in [5] * 8 + [60] * 2]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    result = cli("data", f"data.path={tmp_path / 't.jsonl'}", "data.eval_fraction=0", "data.max_length=16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 10 rows (2 longer than max_length=16: dropped)" in result.stdout
    p100 = int(result.stdout.split("p100 ")[1].split()[0])
    assert p100 > 60  # the longest row, not the longest kept
    assert "training would stop here: 2 rows over data.max_length=16" in result.stdout
