"""Speed and memory of our recipe path against the vanilla stack, in the same run, on the same machine.

    python scripts/bench.py --arch llama2_7b --seq 2048 --steps 40 --out scripts/bench_results/h100.json   # GPU
    python scripts/bench.py --arch llama3_8b --seq 2048 --steps 40 --out scripts/bench_results/h100_llama3.json
    python scripts/bench.py --arch llama3_8b --longest 16 24 --out scripts/bench_results/h100_longest.json
    python scripts/bench.py --cpu-smoke --out /tmp/bench.json                     # tiny model, CPU, seconds (CI)
    python scripts/bench.py ... --variant no_liger:train.liger_kernel=false       # also ours with one lever off

Both paths train the same model (the architecture built from its config with random weights: nothing is
downloaded), on the same synthetic text rows (lengths spread up to --seq tokens), with the same LoRA
(r=16, alpha 32, dropout 0.05, all linear layers), learning rate, seed and effective batch, each in a
fresh process so that its peak memory is its own (--cpu-smoke, which only checks that the script works, runs
both in its own process).

- vanilla: what the usual guides assemble: transformers + peft + bitsandbytes + TRL's SFTTrainer, NF4 +
  double quant, prepare_model_for_kbit_training, gradient checkpointing, paged 8-bit AdamW, SDPA,
  padded batches.
- ours: `python -m finetune recipe=qlora_llama7b` with the levers on: padding-free batches
  (data.padding_free), Liger kernels (train.liger_kernel, CUDA only) and train.auto_fit (the largest
  micro-batch that fits, checkpointing off where it fits), same effective batch.

Reported per path: trained (non-padding) tokens/s and median step time after --warmup steps, peak GPU
memory reserved and allocated, MFU, and the per-step losses; then the ratios ours / vanilla and the
largest relative loss difference over the first 50 steps (the same math: same rows, same order).
MFU counts model FLOPs per trained token as 4N + 6*L*h*s: 2N forward and 2N backward through the
activations for the N weights in matmuls (layers and lm_head), and causal attention over rows of mean
length s (forward 2*L*h*s, backward twice that); recomputation is not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "finetune" / "assets" / "tiny_llama"
LORA = dict(r=16, alpha=32, dropout=0.05)
LR, SEED = 2e-4, 42


def random_arch():
    spec = importlib.util.spec_from_file_location("random_arch_run", ROOT / "scripts" / "random_arch_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_rows(path: Path, seq: int, rows: int) -> float:
    """Text rows of about seq/4 to seq tokens (about one token per word); returns the mean length in words."""
    rng = random.Random(0)
    words = "the red fox sees a big owl near the old barn and runs to the river".split()
    lengths = [rng.randint(max(8, seq // 4), seq - 8) for _ in range(rows)]
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    return sum(lengths) / len(lengths)


# ---- the vanilla path, as the guides write it (run in a child process) ---------------------------

def limit_memory(args) -> None:
    """Cap this process's GPU memory at --budget-gb (torch.cuda.set_per_process_memory_fraction)."""
    import torch

    if args.budget_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb / total))


def vanilla(args) -> dict:
    import torch

    limit_memory(args)
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    if not cuda:  # see finetune.model.keep_4bit_cpu_layers_differentiable
        for m in model.modules():
            if getattr(m, "support_avx512bf16_for_cpu", False):
                m.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    data = load_dataset("json", data_files=str(args.data), split="train")
    clock = StepClock()
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=data, callbacks=[clock],
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=str(args.workdir / "vanilla-out"), max_steps=args.steps, learning_rate=LR,
                       per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.grad_accum,
                       gradient_checkpointing=True, optim="paged_adamw_8bit", bf16=cuda, use_cpu=not cuda,
                       max_length=args.seq, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
                       data_seed=SEED, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3),
    )
    trainer.train()
    return clock.result(args.warmup)


class StepClock:
    """A TrainerCallback (made lazily, as transformers is imported in the child) that times each step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.records = []

            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.records.append({"step": state.global_step, "time": time.perf_counter() - self.t0})

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and self.records:
                    self.records[-1].update(loss=logs["loss"], num_tokens=logs.get("num_tokens"))

            def result(self, warmup):
                return step_figures([{"step_time_s": r["time"], "loss": r.get("loss"), "num_tokens": r.get("num_tokens")}
                                     for r in self.records], warmup)

        return Clock()


def step_figures(records: list[dict], warmup: int) -> dict:
    """tokens/s and median step time after `warmup` steps, from per-step time, loss and cumulative tokens."""
    import torch

    timed = records[warmup:]
    tokens = (timed[-1]["num_tokens"] - records[warmup - 1]["num_tokens"]) if warmup and timed else None
    seconds = sum(r["step_time_s"] for r in timed)
    return {
        "tokens_per_second": tokens / seconds if tokens and seconds else None,
        "median_step_s": statistics.median(r["step_time_s"] for r in timed) if timed else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if torch.cuda.is_available() else None,
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "losses": [r["loss"] for r in records],
    }


# ---- our path: the real CLI ---------------------------------------------------------------------

def ours_overrides(args, cuda: bool, run_dir: Path) -> list[str]:
    return ["recipe=qlora_llama7b", f"model.name_or_path={args.model}",
           f"model.tokenizer={TOKENIZER}", f"data.path={args.data}", "data.format=text", "data.eval_path=null",
           "data.eval_split=null", "data.eval_fraction=0", f"data.max_length={args.seq}", "data.too_long=truncate",
           "data.padding_free=true", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
           f"train.grad_accum={args.grad_accum}", f"train.learning_rate={LR}", f"train.seed={SEED}",
           "train.logging_steps=1", f"train.save_steps={10 * args.steps}", "train.eval_steps=0",
           "eval.exact_match_samples=0", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
           f"lora.dropout={LORA['dropout']}", "tracking=none", "export=adapter", f"output_dir={run_dir}",
           *(["train.liger_kernel=true", "train.auto_fit=true"] if cuda else [])]


def ours(args, cuda: bool, extra: tuple = ()) -> dict:
    """Our path; `extra` overrides make a --variant of it (one lever switched off, say)."""
    run_dir = args.workdir / f"ours-{time.time():.0f}{'-' + '-'.join(extra) if extra else ''}".replace("=", "_")
    cmd = [sys.executable, "-m", "finetune", *ours_overrides(args, cuda, run_dir), *extra]
    print(" ".join(cmd), flush=True)
    if args.cpu_smoke:
        from finetune.__main__ import main as cli

        assert cli(cmd[3:]) == 0
    else:
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step_time_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    out = step_figures(steps, args.warmup)
    out.update(peak_reserved_gb=summary.get("peak_memory_reserved_gb"),
               peak_allocated_gb=summary["peak_memory_gb"] if cuda else None, auto_fit=summary.get("auto_fit"))
    out["losses"] = [r["loss"] for r in records if "loss" in r]
    return out


def attempt(path, *args) -> dict:
    """A path's figures, or what made it fail (the others are still measured)."""
    try:
        return path(*args)
    except (subprocess.CalledProcessError, AssertionError, OSError) as e:
        print(f"path failed: {e}", file=sys.stderr, flush=True)
        return {"failed": str(e), "tokens_per_second": None, "median_step_s": None, "peak_reserved_gb": None,
                "peak_allocated_gb": None, "losses": []}


# ---- the longest sequence under a memory budget -------------------------------------------------

def trains(args, path: str, seq: int, budget_gb: float) -> bool:
    """Whether `path` trains 2 steps of one row of `seq` tokens within budget_gb of GPU memory."""
    data = args.workdir / f"rows-full-{seq}.jsonl"
    with open(data, "w") as f:  # rows that fill the whole sequence: the length is what is tested
        for _ in range(4):
            f.write(json.dumps({"text": " ".join(["the red fox"] * (seq // 3 + 8))}) + "\n")
    common = ["--model", str(args.model), "--data", str(data), "--workdir", str(args.workdir), "--seq", str(seq),
              "--steps", "2", "--warmup", "1", "--micro-batch", "1", "--grad-accum", "1", "--budget-gb", str(budget_gb)]
    done = subprocess.run([sys.executable, __file__, "--child", path, *common], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done.returncode == 0


def longest(args, path: str, budget_gb: float, start: int = 512, limit: int = 131072) -> int:
    """Doubling, then 3 bisection steps: the longest sequence (a multiple of 256) that trains."""
    good, bad, seq = 0, None, start
    while seq <= limit and trains(args, path, seq, budget_gb):
        good, seq = seq, seq * 2
    bad = seq if seq <= limit else None
    for _ in range(3 if good and bad else 0):
        mid = (good + bad) // 2 // 256 * 256
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if trains(args, path, mid, budget_gb) else (good, mid)
    print(f"{path}: longest sequence within {budget_gb} GB: {good}", flush=True)
    return good


# ---- the comparison -----------------------------------------------------------------------------

def model_flops_per_token(arch: dict, mean_len: float) -> float:
    n = arch["num_hidden_layers"] * (4 * arch["hidden_size"] ** 2 + 3 * arch["hidden_size"] * arch["intermediate_size"])
    if arch.get("num_key_value_heads") and arch["num_key_value_heads"] != arch["num_attention_heads"]:
        kv = arch["hidden_size"] * arch["num_key_value_heads"] // arch["num_attention_heads"]
        n -= arch["num_hidden_layers"] * 2 * arch["hidden_size"] * (arch["hidden_size"] - kv)
    n += arch["vocab_size"] * arch["hidden_size"]  # lm_head
    return 4 * n + 6 * arch["num_hidden_layers"] * arch["hidden_size"] * mean_len


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama2_7b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/finetune_bench"))
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU, a few steps: checks that it runs")
    ap.add_argument("--longest", type=float, nargs="*", metavar="GB",
                    help="instead: the longest sequence each path trains within these GPU memory budgets, e.g. 16 24")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also run our path with these overrides (e.g. no_liger:train.liger_kernel=false): what one "
                         "lever gives")
    ap.add_argument("--budget-gb", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["vanilla", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "vanilla":
        result = vanilla(args)
        (args.workdir / f"vanilla-{args.arch}.json").write_text(json.dumps(result))
        return 0
    if args.child == "ours":  # the real CLI, in this process, under the memory budget
        import torch

        from finetune.__main__ import main as cli

        limit_memory(args)
        run_dir = args.workdir / f"ours-{args.seq}-{int(time.time())}"
        return cli(ours_overrides(args, torch.cuda.is_available(), run_dir))

    import torch

    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        args.arch, args.seq, args.steps, args.warmup, args.micro_batch, args.grad_accum = "tiny", 128, 4, 1, 2, 1
    elif not cuda:
        print("bench.py measures GPU speed and memory and this machine has no CUDA GPU: run it on one, or pass "
              "--cpu-smoke to check that it runs.", file=sys.stderr)
        return 2
    rar = random_arch()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.model = args.workdir / f"{args.arch}-random"
    rar.build_model(args.arch, args.model)
    if args.longest:
        found = {f"{gb:g} GB": {path: longest(args, path, gb) for path in ("vanilla", "ours")} for gb in args.longest}
        for r in found.values():
            r["ratio"] = r["ours"] / r["vanilla"] if r["vanilla"] else None
        report = {"arch": args.arch, "gpu": torch.cuda.get_device_name(0), "longest_sequence": found,
                  "how": "torch.cuda.set_per_process_memory_fraction(budget / total), micro-batch 1, 2 steps; "
                         "doubling from 512, then 3 bisection steps"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    args.data = args.workdir / f"rows-{args.seq}.jsonl"
    mean_words = write_rows(args.data, args.seq, rows=max(64, 2 * args.steps * args.micro_batch * args.grad_accum))

    baseline = args.workdir / f"vanilla-{args.arch}.json"
    baseline.unlink(missing_ok=True)
    if args.cpu_smoke:  # it checks that the script works: both paths in this process (no memory is measured)
        baseline.write_text(json.dumps(vanilla(args)))
    else:
        child = [sys.executable, __file__, "--child", "vanilla", "--arch", args.arch, "--model", str(args.model),
                 "--data", str(args.data),
                 "--workdir", str(args.workdir), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum)]
        subprocess.run(child, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = {"vanilla": json.loads(baseline.read_text()), "ours": attempt(ours, args, cuda)}
    for variant in args.variant:
        name, _, overrides = variant.partition(":")
        results[f"ours, {name}"] = attempt(ours, args, cuda, tuple(overrides.split(",")))

    from finetune.plan import local_gpu

    gpu = local_gpu() if cuda else None
    fpt = model_flops_per_token(rar.ARCHS[args.arch], min(args.seq, mean_words))
    for r in results.values():
        r["mfu"] = r["tokens_per_second"] * fpt / (gpu.tflops * 1e12) if gpu and r["tokens_per_second"] else None
    v = results["vanilla"]
    keys = ("tokens_per_second", "median_step_s", "peak_reserved_gb", "peak_allocated_gb")
    ratios = {name: {k: r[k] / v[k] if r.get(k) and v.get(k) else None for k in keys}
              for name, r in results.items() if name != "vanilla"}
    n = min(50, *(len(r["losses"]) for r in results.values() if r["losses"]))
    report = {
        "arch": args.arch, "seq": args.seq, "steps": args.steps, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "gpu": gpu.name if gpu else "cpu (smoke: figures mean nothing)",
        "mfu_formula": "(4N + 6*L*h*s_mean) FLOPs per trained token / the GPU's dense 16-bit peak",
        "flops_per_token": fpt, **results, "ratios": ratios["ours"],
        "variant_ratios": {name: r for name, r in ratios.items() if name != "ours"},
        "loss_max_rel_diff_first_steps": max((abs(a - b) / abs(a) for r in results.values() if r is not v
                                              for a, b in zip(v["losses"][:n], r["losses"][:n])), default=None),
    }
    fmt = lambda x, f="{:.3g}": "-" if x is None else f.format(x)  # noqa: E731
    times = lambda x: "-" if x is None else f"{x:.3g}x"  # noqa: E731
    table = ["| path | tokens/s | median step (s) | peak reserved (GB) | peak allocated (GB) | MFU |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        table.append(f"| {name} | {fmt(r['tokens_per_second'], '{:,.0f}')} | {fmt(r['median_step_s'])} | "
                     f"{fmt(r['peak_reserved_gb'])} | {fmt(r['peak_allocated_gb'])} | {fmt(r['mfu'], '{:.1%}')} |")
    for name, rr in ratios.items():
        table.append(f"| {name} / vanilla | {times(rr['tokens_per_second'])} | {times(rr['median_step_s'])} | "
                     f"{times(rr['peak_reserved_gb'])} | {times(rr['peak_allocated_gb'])} | |")
    text = (f"# {args.arch}, seq {args.seq}, {report['gpu']}\n\n" + "\n".join(table) +
            f"\n\nlargest relative loss difference (any path against vanilla) over the first {n} steps: "
            f"{fmt(report['loss_max_rel_diff_first_steps'])}\n")
    report["table"] = "\n".join(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
