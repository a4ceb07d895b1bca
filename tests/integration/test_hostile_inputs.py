"""Hostile inputs, table-driven: each is exit code 2 with one message naming the problem and where it is,
no traceback (main() runs in-process here, so any escaping exception fails the test), and nothing lost or
overwritten. Then property-based fuzzing of the data validator."""

import json
import os
from pathlib import Path

import pytest

from finetune.__main__ import main


def row(user="Hi", assistant="Hello!"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = [json.dumps(row(f"q{i}", f"a{i}")) for i in range(40)]


def lines_with(bad: str, at: int = 3) -> str:
    return "\n".join(GOOD[:at] + [bad] + GOOD[at:]) + "\n"


# name -> file content (str or bytes), written under the test's data folder
DATA = {
    "broken.jsonl": lines_with('{"messages": [broken'),
    "missing_field.jsonl": lines_with(json.dumps({"conversation": []})),
    "empty_content.jsonl": lines_with(json.dumps(row("", ""))),
    "wrong_type.jsonl": lines_with(json.dumps(row(5, ["x"]))),
    "not_a_list.jsonl": lines_with(json.dumps({"messages": "hello"})),
    "no_assistant.jsonl": lines_with(json.dumps({"messages": [{"role": "user", "content": "x"}]})),
    "unknown_role.jsonl": lines_with(json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                                              {"role": "assistant", "content": "y"}]})),
    "top_level_list.jsonl": lines_with("[1, 2, 3]"),
    "empty.jsonl": "",
    "binary.jsonl": bytes(range(256)) * 8,
    "latin1.jsonl": ("\n".join(GOOD[:3]) + "\n").encode() + json.dumps(row("caf\u00e9", "x"), ensure_ascii=False).encode(
        "latin-1") + b"\n" + ("\n".join(GOOD[3:]) + "\n").encode(),
    "enormous.jsonl": lines_with(json.dumps(row("tell me " * 50000, "ok"))),
    "prompt_only.jsonl": "\n".join([json.dumps({"prompt": "a", "completion": "b"})] * 5 + [json.dumps({"prompt": "a"})]) + "\n",
    "reasoning_on_user.jsonl": lines_with(json.dumps({"messages": [
        {"role": "user", "content": "x", "reasoning_content": "y"}, {"role": "assistant", "content": "z"}]})),
    "tool_without_call.jsonl": lines_with(json.dumps({"messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "z"}]})),
    "system_rows.jsonl": "\n".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, *row(f"q{i}")["messages"]]})
                                   for i in range(40)) + "\n",
    "long_rows.jsonl": "\n".join(GOOD[:30] + [json.dumps(row("tell me " * 40, "ok"))] * 10) + "\n",
    "bad.csv": "prompt,completion\na,b\n\"unclosed,c\n",
    "bad.json": '{"not": "a list of rows"',
    "nested.jsonl": lines_with("[" * 100000 + "]" * 100000),
}

CONFIG_CASES = [  # (id, overrides, what the message must say)
    ("unknown key", ["train.learnig_rate=1e-4"], ["Unknown config key 'train.learnig_rate'", "Did you mean 'train.learning_rate'"]),
    ("hf alias", ["lr=1e-4"], ["Unknown config key 'lr'", "train.learning_rate"]),
    ("unknown group key", ["wandb.project=x"], ["Unknown config key 'wandb.project'"]),
    ("wrong type", ["train.epochs=many"], ["train.epochs", "float"]),
    ("wrong type bool", ["data.packing=perhaps"], ["data.packing"]),
    ("negative lr", ["train.learning_rate=-1"], ["train.learning_rate=-1.0 is out of range", "> 0"]),
    ("dropout range", ["lora.dropout=2"], ["lora.dropout=2.0 is out of range", "<= 0.9"]),
    ("bad choice", ["train.optim=sgd"], ["train.optim=sgd is not allowed", "paged_adamw_8bit"]),
    ("unknown recipe", ["recipe=qlora_llama9b"], ["Unknown recipe 'qlora_llama9b'", "qlora_llama7b"]),
    ("unknown group option", ["quant=fp8"], ["Unknown option 'fp8' for group 'quant'", "nf4"]),
    ("typo in list entry", ["data.sources=[{pth: a.jsonl}]"], ["Unknown key 'pth'", "Did you mean 'path'"]),
    ("resume and overwrite", ["resume=true", "overwrite=true"], ["resume=true and overwrite=true contradict"]),
    ("quantized full fine-tune", ["lora=off"], ["quant=nf4 with lora.enabled=false"]),
    ("offload in training", ["model.offload=cpu"], ["model.offload=cpu is for generate and eval"]),
    ("activation offloading on a CPU", ["train.activation_offloading=true"],
     ["train.activation_offloading=true moves activations from a GPU to CPU RAM"]),
    ("16-bit master weights with LoRA", ["train.master_weights=16bit"], ["train.master_weights=16bit is for full "
                                                                          "fine-tuning (lora=off)"]),
    ("16-bit master weights in fp16", ["lora=off", "quant=none", "train.master_weights=16bit", "train.precision=fp16"],
     ["train.master_weights=16bit trains bf16 weights, but train.precision=fp16"]),
    ("16-bit master weights on CPU fp32", ["lora=off", "quant=none", "export=adapter", "train.master_weights=16bit"],
     ["train.master_weights=16bit trains bf16 weights, and this run trains in fp32 on cpu"]),
    ("missing model path", ["model.name_or_path=/nonexistent/model"], ["model.name_or_path=/nonexistent/model: no such folder"]),
    ("unknown verb", None, ["Unknown verb 'trian'", "Did you mean 'train'"]),
    ("bad option", ["--cfg", "yaml"], ["--cfg takes 'job'"]),
    ("lora target typo", ["lora.target_modules=[q_prj]"], ["lora.target_modules: q_prj names no module of",
                                                          "Did you mean 'q_proj'"]),
    ("modules_to_save typo", ["lora.modules_to_save=[nope]"], ["lora.modules_to_save: nope names no module of"]),
    ("skip_modules typo", ["quant.skip_modules=[model.layer.0]"], ["quant.skip_modules: model.layer.0 matches no"]),
    ("column typo", ["data.columns.messages=nope"], ["data.columns.messages=nope: no row of data.path=",
                                                    "(its columns: messages)"]),
    ("missing data on a Hub recipe", ["recipe=qlora_llama7b", "data.path=/nonexistent/rows.jsonl"],
     ["data.path=/nonexistent/rows.jsonl: no such file or folder"]),
]

DATA_CASES = [  # (file, extra overrides, fragments: the problem and where)
    ("broken.jsonl", [], ["broken.jsonl:4: invalid JSON"]),
    ("missing_field.jsonl", [], ["missing_field.jsonl:4: the row has no 'messages' field"]),
    ("empty_content.jsonl", [], ["empty_content.jsonl:4:", "empty or non-text 'content'"]),
    ("wrong_type.jsonl", [], ["wrong_type.jsonl:4:", "empty or non-text 'content'"]),
    ("not_a_list.jsonl", [], ["not_a_list.jsonl:4:", "must be a non-empty list"]),
    ("no_assistant.jsonl", [], ["no_assistant.jsonl:4: the row has no assistant message"]),
    ("unknown_role.jsonl", [], ["unknown_role.jsonl:4:", "role 'wizard'", "allowed: system, user, assistant"]),
    ("top_level_list.jsonl", [], ["top_level_list.jsonl:4: the row is a list, not an object"]),
    ("empty.jsonl", [], ["empty.jsonl: holds no rows"]),
    ("binary.jsonl", [], ["binary.jsonl:", "is not UTF-8"]),
    ("latin1.jsonl", [], ["latin1.jsonl:4:", "not UTF-8"]),
    ("enormous.jsonl", ["data.too_long=error"], ["data.max_length"]),
    ("prompt_only.jsonl", [], ["prompt_only.jsonl:6: the row has no 'completion' field"]),
    ("reasoning_on_user.jsonl", [], ["reasoning_on_user.jsonl:4:", "'reasoning_content': reasoning belongs to assistant"]),
    ("tool_without_call.jsonl", [], ["tool_without_call.jsonl:4:", "(tool) answers no tool call of an earlier assistant"]),
    ("long_rows.jsonl", [], ["train rows", "are longer than data.max_length=128 tokens and would be dropped",
                             "data.max_length=352 keeps 99%"]),
    ("bad.csv", [], ["bad.csv:3:"]),
    ("bad.json", [], ["bad.json"]),
    ("nonexistent.jsonl", [], ["nonexistent.jsonl: no such file or folder"]),
    ("empty_folder", [], ["the folder holds no .jsonl, .json, .csv, .parquet files"]),
    ("nested.jsonl", [], ["nested.jsonl:4: JSON nested too deeply"]),
    ("fifo.jsonl", [], ["fifo.jsonl: not a regular file or folder (a FIFO"]),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, content in DATA.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (folder / "empty_folder").mkdir()
    os.mkfifo(folder / "fifo.jsonl")  # opened, it would wait for a writer forever
    return folder


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def check(code, err, fragments):
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(capsys, tmp_path, overrides, fragments):
    out = tmp_path / "run"
    argv = ["trian"] if overrides is None else [*overrides, f"output_dir={out}"]
    check(*run(capsys, argv), fragments)
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("name, extra, fragments", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(capsys, tmp_path, tiny_args, data_dir, name, extra, fragments):
    out = tmp_path / "run"
    argv = tiny_args(out, f"data.path={data_dir / name}", *extra)
    before = {p: p.read_bytes() for p in data_dir.iterdir() if p.is_file()}
    check(*run(capsys, argv), fragments)
    assert not out.exists()  # checked before anything is written
    assert {p: p.read_bytes() for p in data_dir.iterdir() if p.is_file()} == before  # the data is untouched


@pytest.fixture(scope="module")
def template_tokenizers(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer with real templates: Gemma 2's (no system role) and DeepSeek-R1-Distill's (its
    prompt opens a thinking block its rendered replies lack: no correct mask)."""
    from transformers import AutoTokenizer

    from tests.helpers import chat_template, with_template

    folders = {}
    for family, template in (("gemma", chat_template("gemma")), ("deepseek_r1_distill", chat_template(
            "deepseek_r1_distill").replace("<\uff5c", "<|").replace("\uff5c>", "|>"))):
        folders[family] = tmp_path_factory.mktemp(family)
        with_template(AutoTokenizer.from_pretrained(tiny_model), template).save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("family, fragments", [
    ("gemma", ["system_rows.jsonl:", ": the chat template refuses it: System role not supported", "... and 33 more",
               "data.system_prompt=fold"]),
    ("deepseek_r1_distill", ["assistant replies cannot be located", "data.train_on_inputs=true"]),
])
def test_a_template_that_refuses_the_rows_or_cannot_be_masked(capsys, tmp_path, tiny_args, data_dir,
                                                              template_tokenizers, family, fragments):
    out = tmp_path / "run"
    argv = tiny_args(out, f"data.path={data_dir / 'system_rows.jsonl'}", f"model.tokenizer={template_tokenizers[family]}")
    check(*run(capsys, argv), fragments)
    assert not out.exists()


def test_rows_a_template_refuses_can_be_dropped_and_are_counted(capsys, tmp_path, tiny_args, data_dir,
                                                                template_tokenizers):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((data_dir / "system_rows.jsonl").read_text() + "\n".join(GOOD) + "\n")
    code = main(["data", *tiny_args(tmp_path / "run", f"data.path={mixed}", "data.bad_rows=drop", "data.eval_fraction=0",
                                    f"model.tokenizer={template_tokenizers['gemma']}")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "train: 80 rows" in out.out and "40 rows the chat template refuses: dropped" in out.out
    assert "dropped 40 row(s) the chat template refuses; first:" in out.err and "System role not supported" in out.err
    check(*run(capsys, ["data", *tiny_args(tmp_path / "run", f"data.path={data_dir / 'system_rows.jsonl'}",
                                           "data.bad_rows=drop", f"model.tokenizer={template_tokenizers['gemma']}")]),
          ["the chat template refuses every row"])


@pytest.fixture
def good_data(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join(GOOD) + "\n")
    return path


def test_an_existing_run_is_kept(capsys, tmp_path, tiny_args, good_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": true}')
    code, err = run(capsys, tiny_args(out, f"data.path={good_data}"))
    check(code, err, [f"output_dir={out} already holds a run", "resume=true", "overwrite=true"])
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == '{"keep": true}'


def test_an_output_dir_that_is_a_file(capsys, tmp_path, tiny_args, good_data):
    out = tmp_path / "run.txt"
    out.write_text("mine")
    check(*run(capsys, tiny_args(out, f"data.path={good_data}")), [f"output_dir={out} is a file, not a folder"])
    assert out.read_text() == "mine"


def test_an_output_dir_that_cannot_be_written(capsys, tmp_path, tiny_args, good_data):
    """Read-only folders cannot be simulated as root, so: a folder under a file, which no one can create."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    check(*run(capsys, tiny_args(blocker / "run", f"data.path={good_data}")),
          [f"output_dir={blocker / 'run'}: cannot write there", "Choose a writable output_dir"])


def test_resume_without_a_checkpoint(capsys, tmp_path, tiny_args, good_data):
    out = tmp_path / "run"
    out.mkdir()
    check(*run(capsys, tiny_args(out, f"data.path={good_data}", "resume=true")),
          ["resume=true but", "holds no checkpoint to resume from"])


def test_a_folder_reads_its_files_and_skips_what_is_not_one(tmp_path, caplog):
    from finetune.config import DataConfig
    from finetune.data import load_splits

    (tmp_path / "good.jsonl").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "sub.jsonl").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    assert len(load_splits(DataConfig(path=str(tmp_path), eval_fraction=0.0), 42).train) == 40
    for name in ("sub.jsonl", "pipe.jsonl", "loop.jsonl"):
        assert f"skipping {name}, which is not a regular file" in caplog.text


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_a_huge_row_is_never_tokenized_whole(tiny_model, tmp_path, monkeypatch, too_long):
    """A row of 20 MB: tokenized whole it would take gigabytes. Dropped unread; or cut to what truncation keeps,
    giving the same first max_length tokens as the whole row."""
    import datasets
    from transformers import AutoTokenizer

    import finetune.data.tokenize as tok
    from finetune.config import DataConfig

    from finetune.data.templates import apply_chat_template_choice

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    apply_chat_template_choice(tokenizer, "plain")
    huge = {"messages": [{"role": "user", "content": "tell me " * 2_500_000}, {"role": "assistant", "content": "ok"}]}
    ds = datasets.Dataset.from_list([row(f"q{i}", f"a{i}") for i in range(39)] + [huge])
    seen = []
    real = tok.tokenize_row
    monkeypatch.setattr(tok, "tokenize_row", lambda r, *a, **k: seen.append(tok.text_chars(r)) or real(r, *a, **k))
    cfg = DataConfig(max_length=64, too_long=too_long, max_drop_fraction=0.5)
    out = tok.tokenize(ds, tokenizer, cfg, f"huge-{too_long}", conversational=True)
    limit = 2 * cfg.max_length * tok.longest_token(tokenizer)
    assert max(seen) <= limit + 100 and out.too_long == 1
    if too_long == "drop":
        assert len(out.dataset) == 39 and len(seen) == 39
    else:
        cut = real(tok.cut_text(huge, limit), tokenizer, False)[0]
        whole = real({"messages": [{"role": "user", "content": "tell me " * 2000}, huge["messages"][1]]}, tokenizer,
                     False)[0]
        assert cut["input_ids"][:64] == whole["input_ids"][:64]


def test_a_bom_and_crlf_line_endings_are_read_as_the_same_rows(tmp_path):
    """Not errors: files saved by Windows tools. They must give exactly the rows of the clean file."""
    from finetune.config import DataConfig
    from finetune.data import load_splits

    clean, bom, crlf = tmp_path / "clean.jsonl", tmp_path / "bom.jsonl", tmp_path / "crlf.jsonl"
    clean.write_text("\n".join(GOOD) + "\n")
    bom.write_bytes(b"\xef\xbb\xbf" + clean.read_bytes())
    crlf.write_bytes(clean.read_bytes().replace(b"\n", b"\r\n"))
    rows = [list(load_splits(DataConfig(path=str(p), eval_fraction=0.0), 42).train) for p in (clean, bom, crlf)]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 40


# ---- fuzzing the data validator -----------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
message = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "wizard", ""]), scalars),
    "content": st.one_of(st.text(max_size=30), scalars, st.lists(scalars, max_size=3)),
    "from": st.sampled_from(["human", "gpt", "x"]), "value": st.text(max_size=10)})
row_strategy = st.one_of(
    st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(message, max_size=4), scalars),
                                         "prompt": st.one_of(st.text(max_size=20), scalars),
                                         "completion": st.one_of(st.text(max_size=20), scalars),
                                         "text": st.one_of(st.text(max_size=20), scalars),
                                         "instruction": st.text(max_size=10), "output": st.text(max_size=10)}),
    st.lists(scalars, max_size=3), scalars)
line_strategy = st.one_of(row_strategy.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_strategy, min_size=0, max_size=12), bad_rows=st.sampled_from(["error", "drop"]),
       fmt=st.sampled_from(["auto", "messages", "prompt_completion", "text", "sharegpt", "instruction"]))
def test_any_file_is_loaded_or_rejected_with_a_message(tmp_path_factory, lines, bad_rows, fmt):
    from finetune.config import DataConfig
    from finetune.data import load_splits
    from finetune.errors import UserError

    path = Path(tmp_path_factory.mktemp("fuzz")) / "rows.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        splits = load_splits(DataConfig(path=str(path), bad_rows=bad_rows, format=fmt, eval_fraction=0.0), 42)
    except UserError as e:
        assert str(e).strip()
    else:
        assert len(splits.train) >= 1


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    """The tiny model with its weights cut short; with code of its own (which must never run); with a pickle that
    is not one."""
    import shutil

    root = tmp_path_factory.mktemp("models")
    folders = {name: shutil.copytree(tiny_model, root / name) for name in ("cut", "remote", "pickle")}
    weights = folders["cut"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((folders["remote"] / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XModel"})
    (folders["remote"] / "config.json").write_text(json.dumps(config))
    (folders["remote"] / "configuration_x.py").write_text("raise SystemExit('the repository code ran')\n")
    (folders["pickle"] / "model.safetensors").unlink()
    (folders["pickle"] / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    return folders


@pytest.mark.parametrize("name, extra, fragments", [
    ("cut", [], ["its weights cannot be read (SafetensorError", "Download or copy the model again"]),
    ("remote", [], ["ships its own modelling code", "model.trust_remote_code=true"]),
    ("pickle", ["model.allow_pickle=true"], ["its weights cannot be read (UnpicklingError"]),
    ("pickle", [], ["has only pickle (.bin) weights", "model.allow_pickle=true"]),
])
def test_a_model_that_cannot_load_is_one_message(capsys, tmp_path, tiny_args, tiny_model, broken_models, name, extra,
                                                 fragments):
    out = tmp_path / "run"
    argv = tiny_args(out, f"model.name_or_path={broken_models[name]}", f"model.tokenizer={tiny_model}", *extra)
    check(*run(capsys, argv), [f"model.name_or_path={broken_models[name]}", *fragments])


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from finetune.data.templates import apply_chat_template_choice

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    apply_chat_template_choice(tokenizer, "plain")
    return tokenizer


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line_strategy, min_size=1, max_size=12), bad_rows=st.sampled_from(["error", "drop"]),
       too_long=st.sampled_from(["drop", "truncate", "error"]), max_length=st.sampled_from([8, 16, 64]))
def test_any_file_is_tokenized_or_rejected_with_a_message(tmp_path_factory, plain_tokenizer, lines, bad_rows, too_long,
                                                          max_length):
    """The data-file fuzzer, through tokenization: every row that loads is tokenized with its labels, or the whole
    file is one UserError (bad rows, rows too long, nothing left to train)."""
    from finetune.config import DataConfig
    from finetune.data import load_splits
    from finetune.data.tokenize import tokenize
    from finetune.errors import UserError

    path = Path(tmp_path_factory.mktemp("fuzz")) / "rows.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    cfg = DataConfig(path=str(path), bad_rows=bad_rows, eval_fraction=0.0, too_long=too_long, max_length=max_length,
                     max_drop_fraction=0.5)
    try:
        splits = load_splits(cfg, 42)
        out = tokenize(splits.train, plain_tokenizer, cfg, "train", splits.conversational)
    except UserError as e:
        assert str(e).strip()
        return
    assert len(out.dataset) >= 1
    for ids, labels in zip(out.dataset["input_ids"], out.dataset["labels"]):
        assert len(ids) == len(labels) and any(label != -100 for label in labels)
        assert too_long != "drop" or len(ids) <= max_length
