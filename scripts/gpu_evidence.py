"""Every GPU figure of ours in one run of under nine minutes on one H100/H200, proven first on CPU.

    bash scripts/gpu_evidence.sh --out DIR               # GPU: installs the carried wheels (.whl/), then this
    bash scripts/gpu_evidence.sh --cpu-smoke --out DIR   # CPU: the same sequence on the tiny model (CI runs it)

Stages, each a fresh process on the GPU (so its peak memory is its own), in this order:
1. planner: `plan`'s predicted peak reserved memory against torch.cuda.max_memory_reserved of the real CLI for
   QLoRA with and without gradient checkpointing, two micro-batches, LoRA on a 16-bit base, int8, inference
   (prefill + decode), and one QLoRA run that also merges (export=merged: the merge's time, peak and fidelity).
   The Llama-2-7B architecture with random weights (scripts/random_arch_run.py; nothing is downloaded).
2. fsdp: configs/accelerate/fsdp_qlora.yaml and fsdp.yaml launched on one GPU (--num_processes 1): they train,
   the adapter loads back onto the base and changes its output, the run's peak memory.
3. bench: scripts/bench.py on the Llama-2-7B and Llama-3-8B architectures, seq 2048: the vanilla stack against
   ours (and, on the first, ours without Liger's kernels: what that lever gives), 15 measured steps after 3 of
   warm-up.
On request (--stages): depth (each of DEPTH_POINTS on 2- and 6-layer cuts: what a layer holds, apart from what the
model holds once) and saved (autograd's saved bytes per token and layer on this device, against plan's model).
Stages 1 and 2 measure memory only, so they run side by side (--parallel); stage 3 measures time and runs alone.
--replan (no GPU) merges evidence.json files and plans every measured setting again with today's plan.
Each stage is cut off where the time budget (--budget-s) would be passed; what finished is kept.

Writes DIR/evidence.json, DIR/evidence.md (printed at the end too) and DIR/logs.tar.gz (every process's log).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "finetune" / "assets" / "tiny_llama"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# (name, quant, max_length, micro_batch, gradient checkpointing, extra overrides)
TRAIN_POINTS = [
    ("QLoRA, checkpointing", "nf4", 2048, 1, True, []),
    ("QLoRA, no checkpointing", "nf4", 2048, 1, False, []),
    ("QLoRA, checkpointing, micro-batch 4", "nf4", 2048, 4, True, []),
    ("QLoRA + merge (export=merged)", "nf4", 1024, 2, True,
     ["export=merged", "export.merge_base=original", "export.max_kl=10"]),  # random weights: KL reported, not judged
    ("LoRA on int8", "int8", 1024, 1, True, []),
    ("LoRA on a 16-bit base", "none", 1024, 1, True, []),
]
INFERENCE_POINT = ("inference NF4: prefill + 8 new tokens", "nf4", 2048, 4)
# (name, accelerate config, quant, extra overrides): bitsandbytes' optimizers cannot update FSDP2's DTensors
FSDP_POINTS = [("FSDP-QLoRA", "fsdp_qlora.yaml", "nf4", []),
               ("FSDP2, 16-bit base, AdamW", "fsdp.yaml", "none", ["train.optim=adamw_torch"])]
# the same setting on 2 and 6 decoder layers of the 7B's width: the plan's per-layer and fixed parts, apart
DEPTH_POINTS = [("QLoRA, no checkpointing", "nf4", 2048, 1, False), ("QLoRA, checkpointing, micro-batch 4", "nf4", 2048, 4, True),
                ("LoRA on int8", "int8", 1024, 1, True), ("LoRA on a 16-bit base, no checkpointing", "none", 1024, 1, False)]
DEPTHS = (2, 6)
BENCH_ARCHS = ["llama2_7b", "llama3_8b"]
STAGES = ["planner", "fsdp", "depth", "saved", "bench"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Job:
    """One measured process: the CLI's training (train), under accelerate launch (fsdp), or inference."""
    name: str
    kind: str                   # train | fsdp | inference
    overrides: list             # the CLI's (train, fsdp) or the config inference loads the model with
    run_dir: Path
    planned: dict = field(default_factory=dict)
    shown: dict = field(default_factory=dict)   # the setting, as the table shows it
    launch: list = field(default_factory=list)  # fsdp: accelerate launch's arguments before `-m finetune`
    check_adapter: bool = False                 # load the adapter back onto its base and see it change the output
    result: dict = field(default_factory=dict)

    def argv(self) -> list:
        """After the interpreter, in a fresh process (GPU)."""
        if self.kind == "inference":
            return [__file__, "--child-inference", str(self.run_dir), *self.overrides]
        return [*self.launch, "-m", "finetune", *self.overrides]


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.time(), budget_s

    def left(self) -> float:
        return self.budget - (time.time() - self.start)


# ---- the settings -------------------------------------------------------------------------------

def base_overrides(model: Path, data: Path, seq: int, steps: int) -> list[str]:
    return ["recipe=qlora_llama7b", f"model.name_or_path={model}", f"model.tokenizer={TOKENIZER}",
            f"data.path={data}", "data.eval_path=null", "data.eval_split=null", "data.eval_fraction=0.05",
            "data.eval_max_samples=2", "data.too_long=truncate", f"data.max_length={seq}",
            f"train.max_steps={steps}", f"train.save_steps={10 * steps}", "train.eval_steps=0",
            "train.logging_steps=1", "eval.exact_match_samples=0", "tracking=none", "export=adapter"]


def setting(quant: str, mb: int, ckpt: bool) -> list[str]:
    return [f"quant={quant}", f"quant.double_quant={'true' if quant == 'nf4' else 'false'}",
            f"train.micro_batch_size={mb}", "train.grad_accum=1",
            f"train.gradient_checkpointing={'true' if ckpt else 'false'}"]


def planned(overrides: list[str], gpu: str, mode: str = "train") -> dict:
    from finetune.plan import GIB, make_plan
    from finetune.registry import load_config

    plan = make_plan(load_config(overrides + [f"plan.gpu={gpu}"]), mode=mode)
    return {"peak_reserved_gb": plan["peak_reserved_gib"] * GIB / 1e9,
            "tokens_per_second": plan.get("tokens_per_second")}


def write_rows(args) -> None:
    """data-1024.jsonl and data-2048.jsonl: conversations whose replies fill the length (the smoke's: --max-seq)."""
    for seq in (1024, 2048):
        load_script("random_arch_run").write_data(args.workdir / f"data-{seq}.jsonl", min(seq, args.max_seq), rows=64)


def job(args, name: str, kind: str, model: Path, quant: str, seq: int, mb: int, ckpt: bool, extra: list, run_dir: Path,
        launch: list = (), **shown) -> Job:
    """A measured run of the CLI (train, fsdp) or of inference, with the plan's prediction for it."""
    cut = min(seq, args.max_seq)
    over = base_overrides(model, args.workdir / f"data-{seq}.jsonl", cut, args.steps) + setting(quant, mb, ckpt) + extra
    if kind != "inference":
        over += [f"output_dir={run_dir}", "overwrite=true"]
    return Job(name, kind, over, run_dir, planned(over, args.plan_gpu, "inference" if kind == "inference" else "train"),
               {"quant": quant, "seq": cut, "micro_batch": mb, "checkpointing": None if kind == "inference" else ckpt,
                **({"layers": args.layers} if args.layers else {}), **shown}, list(launch), check_adapter=kind == "fsdp")


# on CPU these take the path of the merge point (NF4, checkpointing or not: the same code)
SMOKE_SKIPS = ("QLoRA, checkpointing", "QLoRA, no checkpointing", "QLoRA, checkpointing, micro-batch 4")


def planner_jobs(args, model: Path) -> list[Job]:
    """TRAIN_POINTS and the inference point; the CPU smoke leaves out the points whose path another one takes."""
    jobs = [job(args, name, "train", model, quant, seq, mb, ckpt, extra, args.workdir / f"train-{i}")
            for i, (name, quant, seq, mb, ckpt, extra) in enumerate(TRAIN_POINTS)
            if not (args.cpu_smoke and name in SMOKE_SKIPS)]
    name, quant, seq, mb = INFERENCE_POINT
    return jobs + [job(args, name, "inference", model, quant, seq, mb, False, [], args.workdir / "inference")]


def fsdp_jobs(args, model: Path) -> list[Job]:
    """Each accelerate config on one GPU (--num_processes 1): FSDP wraps the model all the same."""
    return [job(args, name, "fsdp", model, quant, 1024, 1, True, extra, args.workdir / f"fsdp-{i}",
                ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
                 "--num_processes", "1", "--main_process_port", str(29500 + i)])
            for i, (name, config, quant, extra) in enumerate(FSDP_POINTS)]


def depth_jobs(args) -> list[Job]:
    """Each DEPTH_POINTS setting on the architecture cut to 2 and to 6 layers (models built here)."""
    rar = load_script("random_arch_run")
    for layers in DEPTHS:
        rar.build_model(args.arch, args.workdir / f"{args.arch}-{layers}l", layers)
    return [job(args, f"{name}, {layers} layers", "train", args.workdir / f"{args.arch}-{layers}l", quant, seq, mb, ckpt,
                [], args.workdir / f"depth-{i}-{layers}", layers=layers)
            for i, (name, quant, seq, mb, ckpt) in enumerate(DEPTH_POINTS) for layers in DEPTHS]


# ---- running them -------------------------------------------------------------------------------

def run_jobs(jobs: list[Job], args, clock: Clock) -> None:
    """GPU: up to --parallel fresh processes at a time, each killed if the time budget runs out.
    CPU smoke: one after another in this process (the same code paths, without a second interpreter's start)."""
    if args.cpu_smoke:
        for job in jobs:
            t0 = time.time()
            with open(args.logs / f"{job.run_dir.name}.log", "w") as log, contextlib.redirect_stderr(log):
                code = run_inline(job)
            job.result = collect(job, code, time.time() - t0, args)
            print(f"[evidence] done {job.name}: {json.dumps(job.result)}", flush=True)
        return
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < args.parallel and clock.left() > args.reserve_s:
            job = waiting.pop(0)
            log = open(args.logs / f"{job.run_dir.name}.log", "w")
            print(f"[evidence] start {job.name}: python {' '.join(map(str, job.argv()))}", flush=True)
            running.append((job, subprocess.Popen([sys.executable, *job.argv()], stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=ROOT, env=ENV), log, time.time()))
        if not running:  # no time left to start the rest
            for job in waiting:
                job.result = {"skipped": "the time budget ran out"}
            break
        time.sleep(1)
        for item in list(running):
            job, proc, log, t0 = item
            if proc.poll() is None and clock.left() > args.reserve_s / 2:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
            running.remove(item)
            job.result = collect(job, proc.returncode, time.time() - t0, args)
            print(f"[evidence] done {job.name}: {json.dumps(job.result)}", flush=True)
            write_report(args, jobs=jobs)


def run_inline(job: Job) -> int:
    """The CPU smoke's run of a job, in this process. An FSDP config is refused on a CPU (exit 2, one message):
    the smoke checks that it gets that far."""
    from finetune.__main__ import main as cli

    if job.kind == "inference":
        return child_inference(job.run_dir, job.overrides)
    if job.kind == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # what accelerate launch sets for an FSDP config
    try:
        return cli(job.overrides)
    finally:
        os.environ.pop("ACCELERATE_USE_FSDP", None)


def collect(job: Job, code: int, wall: float, args) -> dict:
    """What a finished process measured, read back from its run directory."""
    out = {"exit": code, "wall_s": round(wall, 1)}
    if code != 0:
        log = args.logs / f"{job.run_dir.name}.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        said = [x.strip() for x in lines if x.startswith("error:") or "Error: " in x]  # ours, else Python's
        return out | {"failed": said[-1] if said else (lines[-1] if lines else "")}
    summary = json.loads((job.run_dir / "summary.json").read_text())
    out["measured_reserved_gb"] = summary.get("peak_memory_reserved_gb")
    out["measured_allocated_gb"] = summary.get("peak_memory_gb")
    keys = ("tokens_per_second", "export_runtime_s", "export_peak_memory_gb", "merge_base", "merge_mean_kl")
    out.update({k: summary[k] for k in keys if summary.get(k) is not None})
    if job.check_adapter:
        out.update(adapter_check(job.run_dir, args.cpu_smoke))
    return out


def adapter_check(run_dir: Path, inline: bool) -> dict:
    """The run's adapter loads back onto its base (16-bit; in a fresh process on a GPU) and changes its output."""
    if inline:
        return check_adapter(run_dir)
    done = subprocess.run([sys.executable, __file__, "--child-adapter", str(run_dir)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV)
    if done.returncode:
        return {"adapter_loads": False, "adapter_error": (done.stderr.strip().splitlines() or [""])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_adapter(run_dir: Path) -> dict:
    import torch

    from finetune.run import Run

    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    model = Run.open(str(run_dir)).load_for_inference(quant="none").model
    ids = torch.arange(3, 67)[None].to(model.device)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    loaded = [p for n, p in model.named_parameters() if "lora_B" in n]
    return {"adapter_loads": True, "adapter_max_logit_change": (tuned - base).abs().max().item(),
            "adapter_tensors": len(saved), "adapter_dtypes": sorted({str(t.dtype) for t in saved.values()}),
            "saved_lora_B_max": max((t.abs().max().item() for k, t in saved.items() if "lora_B" in k), default=None),
            "loaded_lora_B_max": max((p.abs().max().item() for p in loaded), default=None),
            "first_key": next(iter(saved), None)}


def saved_stage(args) -> dict:
    """What autograd keeps per token and decoder layer on this device, against the plan's activation model: the
    real loader, LoRA as TRL makes it (bf16 adapters on a quantized base, fp32 ones on a 16-bit base), under the
    Trainer's bf16 autocast, one row of --saved-seq tokens, no checkpointing; 1 and 2 layers of the architecture."""
    rar, out = load_script("random_arch_run"), {}
    for layers in (1, 2):
        rar.build_model(args.arch, args.workdir / f"{args.arch}-{layers}l", layers)
    for quant in ("nf4", "int8", "none"):
        try:
            kept = {n: saved_by_kind(args.workdir / f"{args.arch}-{n}l", quant, args.saved_seq) for n in (1, 2)}
        except Exception as e:  # noqa: BLE001 (a diagnosis: report what broke, measure the rest)
            out[quant] = {"failed": f"{type(e).__name__}: {e}"}
            continue
        kinds = {k: (kept[2].get(k, 0) - kept[1].get(k, 0)) / args.saved_seq for k in kept[1].keys() | kept[2].keys()}
        out[quant] = {"measured_bytes_per_token_layer": sum(kinds.values()),
                      "planned_bytes_per_token_layer": planned_saved(args.workdir / f"{args.arch}-1l", quant),
                      "by_dtype_and_width": {k: v for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v}}
        print(f"[evidence] saved per token and layer, {quant}: {json.dumps(out[quant])}", flush=True)
    return out


def saved_by_kind(path: Path, quant: str, seq: int) -> dict:
    """Bytes of every storage autograd saves in one forward, by 'dtype x last dimension' (parameters excluded)."""
    import torch

    from finetune.lora import build_peft_config
    from finetune.model import detect_device, load_base_model
    from finetune.registry import load_config
    from peft import get_peft_model

    cfg = load_config(["recipe=qlora_llama7b", f"model.name_or_path={path}", *setting(quant, 1, False)])
    device = detect_device(cfg.train, cfg.quant, cfg.model)
    model = get_peft_model(load_base_model(cfg.model, cfg.quant, device), build_peft_config(cfg.lora))
    if quant != "none":  # TRL's QLoRA adapters
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = (f"{str(t.dtype).removeprefix('torch.')} x {t.shape[-1] if t.dim() else 1}",
                                                    t.untyped_storage().nbytes())
        return t

    ids = torch.randint(3, 1000, (1, seq), device=model.device)
    cuda = model.device.type == "cuda"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cuda):
        model.train()(input_ids=ids, labels=ids)
    kinds = {}
    for kind, nbytes in seen.values():
        kinds[kind] = kinds.get(kind, 0) + nbytes
    del model
    if cuda:
        torch.cuda.empty_cache()
    return kinds


def planned_saved(model: Path, quant: str) -> float:
    """What plan says autograd saves per token and layer (16-bit adapters: the Trainer's autocast computes fp32 ones
    in 16 bits too), before what a CUDA GPU holds beside (finetune.plan.activations)."""
    from finetune.plan import activation_bytes_per_token, load_arch
    from finetune.registry import load_config

    cfg = load_config(["recipe=qlora_llama7b", f"model.name_or_path={model}", *setting(quant, 1, False)])
    arch = load_arch(cfg.model, cfg.lora)
    return activation_bytes_per_token(arch, cfg.lora, cfg.lora.r, 2, False, adapters_16bit=True)["layers"] / arch.layers


def child_inference(run_dir: Path, overrides: list[str]) -> int:
    """The base loaded as `generate` loads it; prefill micro_batch x (max_length - 8) tokens, then 8 greedy tokens."""
    import torch

    from finetune.model import detect_device, load_base_model
    from finetune.registry import load_config

    cfg = load_config(overrides)
    device = detect_device(cfg.train, cfg.quant, cfg.model)
    model = load_base_model(cfg.model, cfg.quant, device)
    ids = torch.randint(3, 1000, (cfg.train.micro_batch_size, cfg.data.max_length - 8), device=model.device)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False)
    cuda = torch.cuda.is_available()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "peak_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}))
    return 0


def bench(args, clock: Clock) -> dict:
    """scripts/bench.py per architecture (vanilla, ours; ours without Liger on the first), alone on the GPU, while
    time is left."""
    results = {}
    for arch in BENCH_ARCHS if not args.cpu_smoke else ["tiny"]:
        if clock.left() < args.reserve_s + (0 if args.cpu_smoke else 90):
            results[arch] = {"skipped": "the time budget ran out"}
            continue
        out = args.workdir / f"bench-{arch}.json"
        argv = (["--cpu-smoke"] if args.cpu_smoke else
                ["--arch", arch, "--seq", "2048", "--steps", "18", "--warmup", "3", "--micro-batch", "2",
                 "--grad-accum", "2"])
        argv += ["--workdir", str(args.workdir), "--out", str(out)]
        if not results and not args.cpu_smoke:  # the first architecture: what Liger's kernels give, alone (CUDA)
            argv += ["--variant", "no_liger:train.liger_kernel=false"]
        code = run_bench(argv, args, clock, arch)
        results[arch] = json.loads(out.read_text()) if code == 0 and out.exists() else {"failed": f"exit {code}"}
        write_report(args, bench=results)
    return results


def run_bench(argv: list[str], args, clock: Clock, arch: str):
    if args.cpu_smoke:  # in this process, as tests/helpers.run_script does
        saved, sys.argv = sys.argv, [str(ROOT / "scripts" / "bench.py"), *argv]
        try:
            return load_script("bench").main()
        finally:
            sys.argv = saved
    with open(args.logs / f"bench-{arch}.log", "w") as log:
        try:
            return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *argv], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=ENV,
                                  timeout=max(1.0, clock.left() - args.reserve_s / 2)).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


# ---- the report ---------------------------------------------------------------------------------

REPORT: dict = {}


def write_report(args, **parts) -> None:
    """evidence.json and evidence.md under --out, rewritten after every finished step (a cut-off run keeps them)."""
    for key, value in parts.items():
        REPORT[key] = [job_row(j) for j in value] if key == "jobs" else value
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evidence.json").write_text(json.dumps(REPORT, indent=2, default=str) + "\n")
    (args.out / "evidence.md").write_text(markdown(REPORT))


def job_row(job: Job) -> dict:
    row = {"name": job.name, "kind": job.kind, **job.shown, "planned_gb": job.planned.get("peak_reserved_gb"),
           "planned_tokens_per_second": job.planned.get("tokens_per_second"), **job.result}
    if row.get("measured_reserved_gb") and row["planned_gb"]:
        row["error"] = row["planned_gb"] / row["measured_reserved_gb"] - 1
    return row


def fmt(x, f="{:.2f}") -> str:
    return "-" if x is None else f.format(x)


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"# GPU evidence: {env.get('gpu', '?')}", "",
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, trl "
             f"{env.get('trl')}, bitsandbytes {env.get('bitsandbytes')}, liger-kernel {env.get('liger_kernel')}. "
             f"Architecture {env.get('arch')} with random weights; GB = 1e9 bytes.", ""]
    rows = report.get("jobs", [])
    now = any("planned_now_gb" in r for r in rows)
    if rows:
        lines += ["## plan against measured peak memory (torch.cuda.max_memory_reserved)", "",
                  "| setting | layers | quant | seq | micro-batch | checkpointing | planned GB | measured GB | error |"
                  + (" planned now | error now |" if now else "") + " notes |",
                  "|" + " --- |" * (10 + 2 * now)]
        for r in rows:
            notes = r.get("failed") or r.get("skipped") or notes_of(r)
            lines.append(f"| {r['name']} | {r.get('layers') or 'all'} | {r.get('quant')} | {r.get('seq')} | "
                         f"{r.get('micro_batch')} | { {True: 'on', False: 'off', None: '-'}[r.get('checkpointing')]} | "
                         f"{fmt(r['planned_gb'])} | {fmt(r.get('measured_reserved_gb'))} | {fmt(r.get('error'), '{:+.1%}')} |"
                         + (f" {fmt(r.get('planned_now_gb'))} | {fmt(r.get('error_now'), '{:+.1%}')} |" if now else "")
                         + f" {notes} |")
        for key, label in (("error", "as planned at the run"), ("error_now", "as planned now")):
            errors = [abs(r[key]) for r in rows if r.get(key) is not None and r["kind"] != "fsdp" and not r.get("layers")]
            if errors:
                lines += ["", f"{label}: {sum(e <= 0.10 for e in errors)} of {len(errors)} single-GPU settings of the "
                              f"whole model within ±10% (FSDP rows are planned as one unsharded GPU)."]
    for quant, r in report.get("saved", {}).items():
        lines += ["", f"saved per token and layer, {quant}: " + (r.get("failed") or
                  f"{fmt(r['measured_bytes_per_token_layer'], '{:,.0f}')} bytes measured (autograd's hooks), "
                  f"{fmt(r['planned_bytes_per_token_layer'], '{:,.0f}')} planned at the run"
                  + (f", {fmt(r['planned_now'], '{:,.0f}')} now" if "planned_now" in r else ""))]
    for arch, b in report.get("bench", {}).items():
        lines += ["", f"## bench: {arch}, seq {b.get('seq', '-')}", ""]
        lines += [b["table"]] if "table" in b else [f"{b.get('failed') or b.get('skipped')}"]
    return "\n".join(lines) + "\n"


def replan(paths: list[Path], out: Path) -> int:
    """Merge evidence.json files of one GPU (their jobs in order, with the run they came from) and plan every
    measured setting again with today's plan (offline: the architecture's config alone): out.json and out.md."""
    import tempfile

    from finetune.plan import GPUS

    merged: dict = {"jobs": []}
    for i, path in enumerate(paths, 1):
        report = json.loads(path.read_text())
        merged["jobs"] += [r | {"run": r.get("run", i)} for r in report.pop("jobs", [])]
        merged.update({k: v for k, v in report.items() if k not in merged or k in ("bench", "saved")})
    env = merged.get("environment", {})
    gpu = next((k for k in GPUS if k.replace("-", "") in env.get("gpu", "").lower().replace(" ", "")), "h200")
    with tempfile.TemporaryDirectory() as tmp:
        for r in merged["jobs"]:
            if r.get("measured_reserved_gb") is None or r["kind"] == "fsdp":
                continue
            folder = Path(tmp) / f"{env.get('arch', 'llama2_7b')}-{r.get('layers') or 'all'}"
            config_only(env.get("arch", "llama2_7b"), folder, r.get("layers") or 0)
            over = base_overrides(folder, Path(tmp) / "rows.jsonl", r["seq"], 3) + \
                setting(r["quant"], r["micro_batch"], bool(r.get("checkpointing")))
            r["planned_now_gb"] = planned(over, gpu, r["kind"] if r["kind"] == "inference" else "train")["peak_reserved_gb"]
            r["error_now"] = r["planned_now_gb"] / r["measured_reserved_gb"] - 1
        config_only(env.get("arch", "llama2_7b"), Path(tmp) / "one-layer", 1)
        for quant, r in merged.get("saved", {}).items():
            r["planned_now"] = planned_saved(Path(tmp) / "one-layer", quant)
    out.with_suffix(".json").write_text(json.dumps(merged, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(merged))
    print(out.with_suffix(".md").read_text())
    return 0


def config_only(arch: str, folder: Path, layers: int) -> None:
    """The architecture's config.json, no weights: all that `plan` reads."""
    from transformers import LlamaConfig

    spec = load_script("random_arch_run").ARCHS[arch] | ({"num_hidden_layers": layers} if layers else {})
    LlamaConfig(**spec).save_pretrained(folder)


def notes_of(r: dict) -> str:
    notes = []
    if r.get("merge_base"):
        notes.append(f"merge {r['export_runtime_s']:.0f} s, export GPU peak {fmt(r.get('export_peak_memory_gb'))} GB, "
                     f"merge KL {fmt(r.get('merge_mean_kl'), '{:.2g}')} ({r.get('merge_base')} base)")
    if r.get("adapter_tensors") == 0:
        notes.append("the adapter file holds no tensor")
    if "adapter_loads" in r:
        notes.append(f"adapter loads: {r['adapter_loads']}, max logit change {fmt(r.get('adapter_max_logit_change'), '{:.2g}')}"
                     if r["adapter_loads"] else f"adapter does not load: {r.get('adapter_error')}")
    if r.get("wall_s") is not None:
        notes.append(f"{r['wall_s']:.0f} s" + (f", run {r['run']}" if r.get("run") else ""))
    return "; ".join(notes)


def environment(arch: str) -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke: figures mean nothing)",
            "arch": arch, **{k.replace("-", "_"): version(k) for k in
                             ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel")}}


# ---- main ---------------------------------------------------------------------------------------

def workdir_default() -> Path:
    """RAM (/dev/shm) where it has room for the random models (about 45 GB with a merged copy), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 60e9:
        return shm / "finetune_evidence"
    return Path("/tmp/finetune_evidence")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_evidence")))
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model on CPU: checks every stage runs (CI)")
    ap.add_argument("--workdir", type=Path, help="models and runs (default: /dev/shm where it has room, else /tmp)")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting work after this many seconds")
    ap.add_argument("--reserve-s", type=float, default=40, help="kept free at the end: a process running then is killed")
    ap.add_argument("--parallel", type=int, default=5, help="memory-only processes at a time on the GPU")
    ap.add_argument("--stages", nargs="*", default=["planner", "fsdp", "bench"], choices=STAGES,
                    help="what to run: planner, fsdp and bench by default; depth (the plan's per-layer and fixed parts "
                         "on 2- and 6-layer cuts) and saved (what autograd keeps per layer on this GPU) on request")
    ap.add_argument("--saved-seq", type=int, default=2048, help="saved stage: tokens in the row")
    ap.add_argument("--layers", type=int, default=0, help="planner and fsdp stages: cut the model to this many layers")
    ap.add_argument("--replan", type=Path, nargs="*", metavar="EVIDENCE_JSON",
                    help="no GPU: merge these evidence.json files and plan every measured setting again with today's "
                         "plan, into --out (a path without suffix: .json and .md are written)")
    ap.add_argument("--child-inference", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-adapter", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    args.overrides = rest
    smoke = args.cpu_smoke
    args.arch, args.steps, args.max_seq = ("tiny", 2, 64) if smoke else ("llama2_7b", 3, 1 << 20)
    args.plan_gpu = "h200" if smoke else "auto"
    args.workdir = args.workdir or (args.out / "work" if smoke else workdir_default())
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.replan:
        return replan(args.replan, args.out)
    if args.child_inference:
        return child_inference(args.child_inference, args.overrides)
    if args.child_adapter:
        print(json.dumps(check_adapter(args.child_adapter)))
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_evidence measures a CUDA GPU and this machine has none: run it on one, or pass --cpu-smoke to "
              "check that every stage runs.", file=sys.stderr)
        return 2
    try:  # every library the stages need, before any time is spent on them
        import bitsandbytes, datasets, hydra, peft, trl  # noqa: F401, E401
    except ImportError as e:
        print(f"gpu_evidence: {e}: install finetune's requirements, or carry them as wheels in .whl/ "
              "(bash scripts/gpu_evidence.sh --download).", file=sys.stderr)
        return 2
    clock = Clock(args.budget_s)
    args.logs = args.workdir / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    write_report(args, environment=environment(args.arch))
    write_rows(args)
    jobs = []
    if {"planner", "fsdp"} & set(args.stages):
        model = args.workdir / f"{args.arch}-{args.layers or 'random'}{'l' if args.layers else ''}"
        load_script("random_arch_run").build_model(args.arch, model, args.layers)
        print(f"[evidence] {model.name} built in {time.time() - clock.start:.0f} s", flush=True)
        jobs += planner_jobs(args, model) if "planner" in args.stages else []
        jobs += fsdp_jobs(args, model) if "fsdp" in args.stages else []
    jobs += depth_jobs(args) if "depth" in args.stages else []
    for first in [j for j in jobs if j.kind == "train"][:1]:  # one run without FSDP too: the check is checked
        first.check_adapter = True
    write_report(args, jobs=jobs)
    run_jobs(jobs, args, clock)
    write_report(args, jobs=jobs)
    if "saved" in args.stages:
        write_report(args, saved=saved_stage(args))
    if "bench" in args.stages:
        bench(args, clock)
    REPORT["wall_s"] = round(time.time() - clock.start, 1)
    write_report(args)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(args.logs, arcname="logs")
    print((args.out / "evidence.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
