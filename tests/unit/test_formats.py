"""Formats detected from every row, converted to what TRL trains on; CSV, Parquet and folders; bad rows."""

import json

import pytest

from finetune.config import Columns, DataConfig
from finetune.data import load_splits
from finetune.errors import UserError


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, **kw):
    return load_splits(DataConfig(path=str(path), eval_fraction=0, **kw), seed=0)


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("row,fmt,converted", [
    ({"messages": CHAT}, "messages", {"messages": CHAT}),
    ({"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello!"}]},
     "sharegpt", {"messages": [{"role": "system", "content": "Be kind."}, *CHAT]}),
    ({"instruction": "Translate to French", "input": "cat", "output": "chat"}, "instruction",
     {"messages": [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]}),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "instruction",
     {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", {"prompt": "2+2=", "completion": "4"}),
    ({"text": "Once upon a time."}, "text", {"text": "Once upon a time."}),
])
def test_each_format_is_detected_and_converted(tmp_path, row, fmt, converted):
    splits = load(jsonl(tmp_path / "d.jsonl", [row, row]))
    assert splits.format == fmt
    assert splits.conversational == (fmt in ("messages", "sharegpt", "instruction"))
    assert splits.train[0] == converted


def test_detection_reads_every_row_not_only_the_first(tmp_path):
    rows = [{"text": "a stray row"}] + [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(3)]
    with pytest.raises(UserError) as e:
        load(jsonl(tmp_path / "d.jsonl", rows))
    assert "d.jsonl:1: the row has no 'prompt' field (it has 'text')" in str(e.value)
    assert "prompt_completion format" in str(e.value)
    assert load(tmp_path / "d.jsonl", format="text", bad_rows="drop").format == "text"


def test_other_column_names_are_mapped(tmp_path):
    rows = [{"question": "Capital of France?", "answer": "Paris"}] * 2
    splits = load(jsonl(tmp_path / "d.jsonl", rows), columns=Columns(instruction="question", output="answer"))
    assert splits.format == "instruction"
    assert splits.train[0]["messages"][1] == {"role": "assistant", "content": "Paris"}
    with pytest.raises(UserError, match="no row matches a known format .fields seen: answer, question."):
        load(tmp_path / "d.jsonl")


def test_bad_rows_drop_counts_each_reason(tmp_path):
    rows = [{"messages": CHAT}] * 3 + ['{"messages": [', {"messages": [{"role": "user", "content": "Hi"}]},
                                       {"messages": [{"role": "bot", "content": "x"}, CHAT[1]]}, {"other": 1}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        load(path)
    text = str(e.value)
    assert f"{path}:4: invalid JSON" in text and f"{path}:5: the row has no assistant message" in text
    assert "data.bad_rows=drop" in text
    splits = load(path, bad_rows="drop")
    assert len(splits.train) == 3
    assert splits.dropped == {"invalid JSON": 1, "no assistant turn": 1, "unknown role": 1, "missing field": 1}


def test_nothing_left_after_dropping_is_a_clear_error(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ['{"messages": [', {"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(UserError, match="no usable rows are left after dropping 2 bad ones"):
        load(path, bad_rows="drop", format="messages")


def test_non_utf8_line_is_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: byte \d+ is not UTF-8"):
        load(path)
    assert load(path, bad_rows="drop").dropped == {"not UTF-8": 1}


def test_csv_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.csv").write_text("instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"instruction": "Say no", "input": None, "output": "no"}]), folder / "b.parquet")
    (folder / "notes.txt").write_text("ignored: not a data file")
    splits = load(folder)
    assert splits.format == "instruction" and len(splits.train) == 3
    assert splits.train[1]["messages"][0]["content"] == "Add\n\n1 and 2"
    (folder / "a.csv").write_text("instruction,input,output\nSay hi,,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"a.csv:2: the row field 'output' is empty"):
        load(folder)


def test_unsupported_files_and_empty_folders(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load(tmp_path / "d.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="the folder holds no .jsonl, .json, .csv, .parquet files"):
        load(tmp_path / "empty")


def test_the_config_offers_exactly_the_formats_the_data_layer_reads():
    from finetune.config import DATA_FORMATS
    from finetune.data.formats import FORMATS

    assert DATA_FORMATS == ["auto", *FORMATS]


def test_real_conversational_shapes_are_read(tmp_path):
    """Content as a list of text parts (OpenAI's), reasoning on replies, tool calls answered by tool messages."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "now?"}]},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                          {"role": "assistant", "content": "Rain.", "thinking": "The tool said rain."}],
             "tools": [{"type": "function", "function": {"name": "weather"}}]}] * 2
    splits = load(jsonl(tmp_path / "d.jsonl", rows))
    from finetune.data.formats import chat

    messages, tools = chat(splits.train[0])
    assert messages[0]["content"] == "Weather now?" and tools == [{"type": "function", "function": {"name": "weather"}}]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert messages[3]["reasoning_content"] == messages[3]["thinking"] == "The tool said rain."
    assert "reasoning_content" not in messages[0] and "tool_calls" not in messages[3]  # absent, not null


@pytest.mark.parametrize("message, problem", [
    ({"role": "user", "content": [{"type": "image", "url": "x"}]}, "empty or non-text 'content'"),
    ({"role": "user", "content": "hi", "reasoning_content": "hm"}, "reasoning belongs to assistant turns"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]},
     "needs a function name and its arguments as an object"),
])
def test_conversational_shapes_that_cannot_be_trained(tmp_path, message, problem):
    rows = [{"messages": [message, {"role": "assistant", "content": "ok"}]}] * 2
    with pytest.raises(UserError, match=problem):
        load(jsonl(tmp_path / "d.jsonl", rows))
