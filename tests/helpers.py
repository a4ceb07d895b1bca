"""Test helpers: a tiny offline model, data files, the one override list of a tiny run, trained-token runs, the CLI
in a subprocess, a script of scripts/ in this process, W&B's offline log reader."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tiny_model(path: Path, with_chat_template: bool = False, template: str | None = None) -> Path:
    """A 2-layer Llama with random weights and a BPE tokenizer trained here: no download. `template`: a real
    chat template (chat_template()), whose special tokens the tokenizer and the embeddings get."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = trained_tokenizer(["<s>", "</s>", "<unk>"])
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token = "<s>", "</s>", "<unk>"
    if with_chat_template:
        from finetune.data.templates import TEMPLATES

        tokenizer.chat_template = TEMPLATES["plain"]
    if template:
        with_template(tokenizer, template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trained_tokenizer(specials: list[str]):
    """A byte-level BPE tokenizer of about 320 tokens trained here on a few hundred sentences: `specials` first (ids
    0, 1, ...), then every byte, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [f"the {a} {b} number {i} is {i * 7 % 100}." for i in range(300) for a, b in [("red", "fox"), ("blue", "owl")]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(dict.fromkeys(specials)), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TEMPLATE_FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"


def chat_template(name: str) -> str:
    """A real chat template: TRL's copy of a model family's (trl/chat_templates/NAME.jinja), else one transcribed
    from a model's public repository into tests/fixtures/chat_templates/ (each file names its source)."""
    import trl

    for folder in (Path(trl.__file__).parent / "chat_templates", TEMPLATE_FIXTURES):
        if (folder / f"{name}.jinja").is_file():
            return (folder / f"{name}.jinja").read_text()
    raise FileNotFoundError(name)


# The family's special tokens, as its template writes them: <|eot_id|>, <|im_start|>, <end_of_turn>, <turn|>, [INST]
SPECIAL = r"<\|[^<>|\s]+\|>|<\|[a-z_]+>|<[a-z_]+\|>|<(?:start|end)_of_[a-z]+>|\[/?[A-Z_]+\]"


def with_template(tokenizer, template: str):
    """The tokenizer with a family's chat template and the special tokens it writes (single tokens, as in the real
    vocabulary)."""
    import re

    tokenizer.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(SPECIAL, template)))})
    tokenizer.chat_template = template
    return tokenizer


def trained_runs(seqs) -> list[list[int]]:
    """The runs of consecutive trained tokens of each sequence, in order."""
    runs = []
    for seq in seqs:
        run = []
        for token, label in zip(seq["input_ids"], seq["labels"]):
            if label != -100:
                assert label == token  # labels are the tokens themselves
                run.append(token)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
    return runs


def write_chat_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} times 7 modulo 100?"},
                {"role": "assistant", "content": f"{i * 7 % 100}"},
            ]}) + "\n")
    return path


# The one override list every tiny run starts from (tiny_overrides adds the model, the data and output_dir):
# 96 chat rows with 5% held out for eval, 4 steps of micro-batch 8, LoRA r=8, a log line per step, no
# exact match, no tracker, the adapter only. The demo recipe's own settings (10 epochs, W&B, merge) are off.
TINY_RUN = ["data.eval_path=null", "data.max_length=128", "train.max_steps=4", "train.micro_batch_size=8",
            "train.grad_accum=1", "train.logging_steps=1", "train.eval_steps=0", "eval.exact_match_samples=0",
            "lora.r=8", "tracking=none", "export=adapter"]


def tiny_overrides(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """TINY_RUN for this model, data and output_dir; each of `extra` replaces the same key or adds one."""
    args = {a.split("=", 1)[0]: a for a in [f"model.name_or_path={tiny_model}", f"data.path={data}",
                                             f"output_dir={out}", *TINY_RUN, *extra]}
    return list(args.values())


def free_port() -> int:
    """A TCP port nothing listens on now (a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(name: str, *argv: str) -> int:
    """scripts/NAME.py's main() in this process, with these command-line arguments (no second interpreter to
    start and import torch in)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    saved = sys.argv
    sys.argv = [str(ROOT / "scripts" / f"{name}.py"), *argv]
    try:
        return module.main()
    finally:
        sys.argv = saved


def run_main(*args, env: dict | None = None, cwd: Path | None = None, wandb_mode: str | None = "offline"):
    """`python -m finetune ARGS` as run_cli runs it, but in this process (no interpreter to start, no torch to
    import again): W&B offline unless wandb_mode=None, `env` set (a None value unsets), in `cwd`. The
    environment and the working directory are restored afterwards, as a process ending would (W&B exports
    WANDB_SERVICE, which a later subprocess would otherwise join). Returns returncode, stdout and stderr."""
    import contextlib
    import io
    from types import SimpleNamespace

    from finetune.__main__ import main

    saved_env, saved_cwd, out, err = dict(os.environ), os.getcwd(), io.StringIO(), io.StringIO()
    changes = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_MODE": wandb_mode, **(env or {})}
    try:
        for key, value in changes.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(map(str, args)))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def too_slow(e: subprocess.TimeoutExpired) -> str:
    """What a test's subprocess running past its timeout most likely means on a 2-core machine."""
    command = " ".join(map(str, e.cmd[:4] if isinstance(e.cmd, list) else [e.cmd]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"too slow: machine busy? `{command} ...` ran past its {e.timeout:.3g} s timeout (load average {load:.1f} "
            f"on {os.cpu_count()} CPUs). Run the tests alone; scripts/bench_threads.py measures what a busy CPU costs.")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600,
            wandb_mode: str | None = "offline", env: dict | None = None,
            launch: tuple = ()) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in a subprocess, offline; wandb_mode=None leaves W&B to the config.
    `env` adds to (or, with a None value, removes from) the environment. `launch`: the options of
    `accelerate launch` to start it with instead (`accelerate launch OPTIONS -m finetune ARGS`)."""
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_TOKEN": None,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    env.pop("WANDB_MODE", None)
    if wandb_mode:
        env["WANDB_MODE"] = wandb_mode
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "finetune"] if launch else \
        [sys.executable, "-m", "finetune"]
    return subprocess.run([*command, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_wandb_log(path: Path) -> list:
    """The records of a W&B offline run file (run-*.wandb): a ':W&B' header, then LevelDB-style
    32 KiB blocks of chunks (crc32, length, type), each record a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in this block for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        else:
            continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_config(records) -> dict:
    """The run's config as logged: {key: value}."""
    config = {}
    for r in records:
        updates = r.config.update if r.HasField("config") else r.run.config.update if r.HasField("run") else []
        config.update({_key(item): json.loads(item.value_json) for item in updates})
    return config


def wandb_history(records, key: str) -> list:
    """Every value logged under `key`, in order."""
    return [json.loads(item.value_json) for r in records if r.HasField("history")
            for item in r.history.item if _key(item) == key]


def effective_base_weights(model) -> dict:
    """What each frozen weight computes with: a 4-bit layer applied to the identity gives its dequantized
    weight whatever the storage layout (bitsandbytes repacks 4-bit weights for its CPU kernel on first use)."""
    import bitsandbytes as bnb
    import torch

    out, was_training = {}, model.training
    model.eval()  # one kernel path for both snapshots: bitsandbytes' CPU inference kernel
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                out[name] = module(torch.eye(module.in_features)).clone()
        for name, p in model.named_parameters():
            if "lora_" not in name and p.dtype.is_floating_point:
                out[name] = p.detach().clone()
    model.train(was_training)
    return out


def go_render(cases: list[dict], build_dir: Path) -> list[dict]:
    """Ollama TEMPLATEs rendered by Go's own text/template as Ollama's server renders them (tests/go/render.go):
    cases [{"template", "messages"}] -> [{"text"} or {"error"}]. The program is built once into build_dir."""
    binary = build_dir / "render"
    if not binary.is_file():
        subprocess.run(["go", "build", "-o", str(binary), str(ROOT / "tests" / "go" / "render.go")], check=True,
                       env={**os.environ, "GOCACHE": str(build_dir / "gocache"), "GO111MODULE": "off"})
    done = subprocess.run([str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def modelfile_template(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile, as Ollama's parser reads a triple-quoted value."""
    return modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
