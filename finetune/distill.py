"""Distillation: a student learns the teacher's next-token distributions.

The teacher runs once over the tokenized training rows and keeps, for every trained token, the top-k of its
next-token log-probabilities (teacher_store: stored on disk beside the tokenization cache, under a key made of the
rows, the teacher and k, so a second run with the same teacher reads them back). The student then trains alone on
alpha x distill_loss + (1 - alpha) x cross-entropy on the same tokens.

distill_loss compares the two distributions on the teacher's top-k words, each renormalized over them (the mass
outside the top-k is unknown: it was not stored), at a temperature: forward KL (teacher || student, mode covering:
the classic distillation loss), reverse KL (student || teacher, mode seeking) or the Jensen-Shannon divergence, times
temperature^2 so that the gradient keeps its size as the temperature changes (Hinton et al., 2015).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from finetune.errors import UserError

log = logging.getLogger("finetune")
VERSION = "1"  # bump when what is stored changes
KINDS = ("forward", "reverse", "jsd")


def check_tokenizers(teacher, student) -> None:
    """Teacher and student must number their words alike: the stored word ids index the student's logits."""
    if teacher.get_vocab() != student.get_vocab():
        a, b = teacher.get_vocab(), student.get_vocab()
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise UserError(f"The teacher's tokenizer ({teacher.name_or_path}, {len(a)} words) and the student's "
                        f"({student.name_or_path}, {len(b)} words) number their words differently (e.g. "
                        f"{', '.join(f'{w!r}={i}' for w, i in differ)}): the teacher's next-token probabilities would "
                        "be read as other words. Distil into a student of the teacher's family (the same tokenizer).")


def check_top_k(top_k: int, vocab: int) -> None:
    if not 1 <= top_k <= vocab:
        raise UserError(f"distill.top_k={top_k}: the teacher's vocabulary has {vocab} words; keep between 1 and "
                        f"{vocab} of them per token (32 keeps nearly all of the probability).")


@torch.no_grad()
def topk_of_row(model, input_ids: list[int], labels: list[int], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (word ids, log-probabilities) of the next token at every trained position of one row:
    the distribution at position t - 1, which predicts labels[t] (labels[t] != -100, t >= 1). Shapes [n, k]."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([input_ids], device=device)).logits[0].float()
    trained = [t - 1 for t in range(1, len(labels)) if labels[t] != -100]
    values, ids = torch.log_softmax(logits[trained], dim=-1).topk(top_k, dim=-1)
    return ids.cpu(), values.cpu()


def store_key(dataset, teacher_id: str, top_k: int) -> str:
    """The rows (their token ids and labels) and the teacher (its folder or Hub id and what identifies its weights)."""
    from finetune.data.tokenize import digest_rows

    h = hashlib.sha256()
    for part in (VERSION, teacher_id, str(top_k)):
        h.update(part.encode() + b"\0")
    digest_rows(h, dataset.select_columns(["input_ids", "labels"]))
    return h.hexdigest()[:24]


def store_dir() -> Path:
    from finetune.data.tokenize import cache_dir

    return cache_dir().parent / "teacher"


def teacher_store(load_model, dataset, top_k: int, teacher_id: str):
    """The tokenized rows with teacher_ids [n, k] and teacher_logprobs [n, k] (float16) per row, n its trained tokens;
    computed once per (rows, teacher, k), read back from the store after that: `load_model()` is called only when
    the store has no such entry, and the model it gives is let go before this returns. Returns (dataset, read back)."""
    import datasets

    from finetune.data.tokenize import keep_cache_small, map_cached
    from finetune.model import release_memory

    path = store_dir() / f"topk-{store_key(dataset, teacher_id, top_k)}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = dataset.features.copy()
    feats["teacher_ids"] = datasets.Sequence(datasets.Sequence(datasets.Value("uint32")))
    feats["teacher_logprobs"] = datasets.Sequence(datasets.Sequence(datasets.Value("float16")))
    held: list = []

    def add(row):
        if not held:
            held.append(load_model().eval())
            check_top_k(top_k, held[0].config.vocab_size)
        ids, logprobs = topk_of_row(held[0], row["input_ids"], row["labels"], top_k)
        return {"teacher_ids": ids.tolist(), "teacher_logprobs": logprobs.half().tolist()}

    try:
        out, cached = map_cached(dataset, path, function=add, features=feats, desc="Teacher's top-k")
    finally:
        held.clear()  # the teacher goes: only the student is in memory while it trains
        release_memory()
    keep_cache_small(path)
    log.info("teacher's top-%d over %d rows %s %s (%.1f MB)", top_k, len(out), "read back from" if cached else
             "stored in", path.parent, sum(f.stat().st_size for f in path.parent.glob(path.stem + "*")) / 1e6)
    return out, cached


@dataclass
class Teacher:
    """distill.teacher resolved: how to load it, its tokenizer, and what identifies its weights (the store's key)."""
    spec: str
    identity: str
    tokenizer: object
    load: Callable[[], object]

    @classmethod
    def of(cls, spec: str, device) -> "Teacher":
        folder = Path(spec).expanduser()
        if (folder / "config.yaml").is_file():  # a run directory (a model folder has config.json)
            return cls.of_run(spec, device)
        from finetune.config import ModelConfig, QuantConfig
        from finetune.model import load_base_model
        from finetune.tokenizer import load_tokenizer

        model_cfg = ModelConfig(name_or_path=spec)
        identity = fingerprint(folder) if folder.is_dir() else spec
        return cls(spec, identity, load_tokenizer(model_cfg),
                   lambda: load_base_model(model_cfg, QuantConfig(method="none"), device))

    @classmethod
    def of_run(cls, spec: str, device) -> "Teacher":
        """A finished run: its merged/ model (16-bit) where there is one, else its base as trained with its adapter,
        or the model/ a full fine-tune wrote."""
        from finetune.run import Run

        run = Run.open(spec)
        kind, source = run_source(run, spec)
        if kind == "model":
            return cls.of(str(source), device)
        return cls(spec, fingerprint(source), run.tokenizer(source),
                   lambda: run.load_for_inference(merged=kind == "merged").model)


def run_source(run, spec: str) -> tuple[str, Path]:
    """Which of a finished run's models teaches, (kind, folder): its merged/ model (16-bit), else adapter/ on its base
    as trained, else a full fine-tune's model/."""
    for kind, folder, marker in (("merged", run.merged_dir, "config.json"), ("adapter", run.adapter_dir,
                                 "adapter_config.json"), ("model", run.model_dir, "config.json")):
        if (folder / marker).is_file():
            return kind, folder
    raise UserError(f"teacher={spec} is a run directory with neither an adapter (adapter/) nor a merged model "
                    f"(merged/) to teach with: it did not finish. Name a finished run, or write its merged model "
                    f"with python -m finetune export run={spec} export.merge=true.")


def teacher_model(spec: str):
    """(ModelConfig, QuantConfig) of the model distill.teacher loads, as Teacher.of loads it, for `plan`: nothing
    loaded, no tokenizer read."""
    from finetune.config import ModelConfig, QuantConfig
    from finetune.run import Run

    if not (Path(spec).expanduser() / "config.yaml").is_file():
        return ModelConfig(name_or_path=spec), QuantConfig(method="none")
    run = Run.open(spec)
    kind, source = run_source(run, spec)
    if kind == "adapter":
        return run.cfg.model, run.cfg.quant
    return ModelConfig(name_or_path=str(source)), QuantConfig(method="none")


def fingerprint(folder: Path) -> str:
    """A folder of weights: its path and each weight file's size and modification time (no reading of gigabytes)."""
    files = sorted(f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    return str(folder.resolve()) + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def check_teacher(distill, data, device, tokenizer) -> Teacher:
    """distill.teacher resolved and checked against the student's tokenizer (no weights loaded): before the run starts."""
    if data.packing:
        raise UserError("distill.teacher with data.packing=true: packing splits and reorders rows, and the teacher's "
                        "top-k is stored row by row. Set data.packing=false (padding-free batches waste nothing).")
    teacher = Teacher.of(distill.teacher, device)
    check_tokenizers(teacher.tokenizer, tokenizer)
    check_top_k(distill.top_k, len(teacher.tokenizer))
    return teacher


def teach(teacher: Teacher, distill, dataset):
    """(the training rows with the teacher's top-k: stored, or read back; the teacher let go, the tokens its pass
    covers: what `plan` and `eval compare=` count its GPU-hours by)."""
    import pyarrow.compute as pc

    tokens = pc.sum(pc.list_value_length(dataset.with_format("arrow")["input_ids"])).as_py() or 0  # the rows kept
    return teacher_store(teacher.load, dataset, distill.top_k, teacher.identity)[0], tokens


def distill_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 kind: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of the divergence between teacher and student on the teacher's top-k words, both renormalized
    over them at `temperature`, times temperature^2. student_logits [n, vocab]; teacher_ids, teacher_logprobs [n, k]."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    s = torch.log_softmax(student_logits.float().gather(-1, teacher_ids.long()) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    if kind == "forward":
        per_token = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - torch.log(torch.tensor(2.0))
        per_token = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    return per_token.mean() * temperature ** 2
