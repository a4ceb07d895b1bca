"""Validate `plan` on a GPU: predicted against measured peak memory for a 7B architecture with random weights.

    python scripts/validate_plan.py --out scripts/bench_results/validate_plan_<gpu>.md     # GPU, ~10 min
    python scripts/validate_plan.py --predict-only --gpu h100                               # no GPU: predictions only

For each configuration (quantization nf4 / int8 / none, sequence length, micro-batch, checkpointing) it
trains a few steps of the real CLI (`python -m finetune recipe=qlora_llama7b`, the model swapped for
random weights of the same shape, as in scripts/random_arch_run.py) in a fresh process and reads the
run's torch.cuda.max_memory_reserved; the prediction is plan's peak reserved by PyTorch (CUDA context
excluded, as max_memory_reserved excludes it). Writes a Markdown table and a JSON file next to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (quant, max_length, micro_batch, checkpointing): the knobs plan must get right
CONFIGS = [
    ("nf4", 512, 1, True),
    ("nf4", 2048, 2, True),
    ("nf4", 1024, 1, False),
    ("nf4", 4096, 1, True),
    ("int8", 1024, 1, True),
    ("none", 1024, 1, True),
    ("none", 512, 2, False),
]


def overrides(quant: str, seq: int, mb: int, ckpt: bool) -> list[str]:
    return [f"quant={quant}", f"quant.double_quant={'true' if quant == 'nf4' else 'false'}",
            f"data.max_length={seq}", f"train.micro_batch_size={mb}", "train.grad_accum=1",
            f"train.gradient_checkpointing={'true' if ckpt else 'false'}"]


def random_arch():
    spec = importlib.util.spec_from_file_location("random_arch_run", ROOT / "scripts" / "random_arch_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama2_7b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu", default="auto", help="plan.gpu for the predictions (auto = this GPU)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/finetune_validate_plan"))
    ap.add_argument("--out", type=Path, default=Path("validate_plan.md"))
    ap.add_argument("--predict-only", action="store_true", help="print the predictions; measure nothing (no GPU needed)")
    args = ap.parse_args()

    import torch

    from finetune.plan import GIB, make_plan
    from finetune.registry import load_config

    if not args.predict_only and not torch.cuda.is_available():
        print("validate_plan.py measures GPU memory and this machine has no CUDA GPU: run it on one, or pass "
              "--predict-only --gpu h100 to see the predictions.", file=sys.stderr)
        return 2
    rar = random_arch()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / f"{args.arch}-{'config-only' if args.predict_only else 'random'}"
    tokenizer = ROOT / "finetune" / "assets" / "tiny_llama"
    base = ["recipe=qlora_llama7b", f"model.name_or_path={model_dir}", f"model.tokenizer={tokenizer}",
            "data.eval_path=null", "data.eval_split=null", "data.eval_fraction=0.05", "data.eval_max_samples=2",
            "data.too_long=truncate", f"train.max_steps={args.steps}", f"train.save_steps={10 * args.steps}",
            "train.eval_steps=0", "train.logging_steps=1", "tracking=none", "export=adapter"]
    if not args.predict_only:
        rar.build_model(args.arch, model_dir)
    else:  # the architecture alone: the plan reads config.json, no weights
        from transformers import LlamaConfig

        model_dir.mkdir(parents=True, exist_ok=True)
        LlamaConfig(**rar.ARCHS[args.arch]).save_pretrained(model_dir)
    rows = []
    for quant, seq, mb, ckpt in CONFIGS:
        data = args.workdir / f"data-{seq}.jsonl"
        rar.write_data(data, seq, rows=64)
        over = base + [f"data.path={data}"] + overrides(quant, seq, mb, ckpt)
        plan = make_plan(load_config(over + [f"plan.gpu={args.gpu}"]))
        row = {"quant": quant, "seq": seq, "micro_batch": mb, "checkpointing": ckpt,
               "predicted_gb": plan["peak_reserved_gib"] * GIB / 1e9, "measured_gb": None, "error": None}
        if not args.predict_only:
            run_dir = args.workdir / f"run-{quant}-{seq}-{mb}-{int(ckpt)}-{int(time.time())}"
            cmd = [sys.executable, "-m", "finetune", *over, f"output_dir={run_dir}"]
            done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
            if done.returncode == 0:
                summary = json.loads((run_dir / "summary.json").read_text())
                row["measured_gb"] = summary["peak_memory_reserved_gb"]
                row["error"] = row["predicted_gb"] / row["measured_gb"] - 1
                row["gpu"] = summary["device"]
            else:
                row["failed"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    gpu = next((r.get("gpu") for r in rows if r.get("gpu")), f"plan.gpu={args.gpu} (predictions only)")
    lines = [f"# plan vs measured peak memory: {args.arch} architecture, random weights, {gpu}", "",
             "Peak reserved by PyTorch (torch.cuda.max_memory_reserved, GB = 1e9 bytes) over "
             f"{args.steps} training steps of `recipe=qlora_llama7b`.", "",
             "| quant | seq | micro-batch | checkpointing | predicted GB | measured GB | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        measured = f"{r['measured_gb']:.2f}" if r["measured_gb"] else r.get("failed", "-")
        error = f"{r['error']:+.1%}" if r["error"] is not None else "-"
        lines.append(f"| {r['quant']} | {r['seq']} | {r['micro_batch']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['predicted_gb']:.2f} | {measured} | {error} |")
    within = [abs(r["error"]) <= 0.10 for r in rows if r["error"] is not None]
    if within:
        lines += ["", f"{sum(within)} of {len(within)} configurations within ±10%."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
