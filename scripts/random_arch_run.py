"""Train a recipe's architecture with random weights: throughput and memory without downloading anything.

    python scripts/random_arch_run.py --arch llama2_7b --steps 20 --seq 2048 --out results.json   # GPU, ~5 min
    python scripts/random_arch_run.py --arch tiny --steps 4 --seq 128 --out /tmp/r.json            # CPU check

Builds the architecture from its config (random weights, saved once to --workdir), writes synthetic
conversations that fill --seq tokens, and runs the real CLI (`python -m finetune recipe=qlora_llama7b`
with the model, tokenizer and data swapped) for --steps steps. Loss values mean nothing here; tokens/s
and peak memory are those of the recipe. The embedded demo tokenizer stands in for the real one (its ids
fit any vocabulary), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
}


def build_model(arch: str, path: Path, layers: int = 0) -> None:
    """The architecture with random weights, saved to `path` (once); `layers` > 0: that many decoder layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(**(ARCHS[arch] | ({"num_hidden_layers": layers} if layers else {})), dtype="bfloat16")
    with torch.device(device):  # random init on the GPU takes seconds, on CPU cores minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the caller goes on to measure other processes: hold no GPU memory


def write_data(path: Path, seq: int, rows: int) -> None:
    """Conversations whose replies fill about `seq` tokens of the demo tokenizer (about one token per word)."""
    rng = random.Random(0)
    words = "the red fox sees a big owl near the old barn and runs to the river".split()
    with open(path, "w") as f:
        for _ in range(rows):
            reply = " ".join(rng.choice(words) for _ in range(seq))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."},
                                             {"role": "assistant", "content": reply}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama2_7b")
    ap.add_argument("--recipe", default="qlora_llama7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/finetune_random_arch"))
    ap.add_argument("--out", type=Path, default=Path("random_arch_results.json"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for the recipe")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / f"{args.arch}-random"
    t0 = time.time()
    build_model(args.arch, model_dir)
    data = args.workdir / f"data-{args.seq}.jsonl"
    write_data(data, args.seq, rows=64)
    run_dir = args.workdir / f"run-{args.arch}-{int(time.time())}"
    cmd = [sys.executable, "-m", "finetune", f"recipe={args.recipe}", f"model.name_or_path={model_dir}",
           f"model.tokenizer={ROOT / 'finetune' / 'assets' / 'tiny_llama'}", f"data.path={data}",
           "data.eval_path=null", "data.eval_split=null", "data.eval_fraction=0.05", "data.eval_max_samples=2",
           f"data.max_length={args.seq}", "data.too_long=truncate",  # the synthetic replies fill --seq; cut the rest
           f"train.max_steps={args.steps}", f"train.save_steps={args.steps}",
           "train.eval_steps=0", "train.logging_steps=1", "tracking=none", "export=adapter", f"output_dir={run_dir}",
           *args.overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_second"] for r in steps if "tokens_per_second" in r and r["step"] > 2)
    result = {
        "arch": args.arch, "recipe": args.recipe, "seq": args.seq, "steps": summary["steps"],
        "device": summary["device"], "precision": summary["precision"],
        "tokens_per_second_overall": summary["tokens_per_second"],
        "tokens_per_second_median_after_step_2": rates[len(rates) // 2] if rates else None,
        "peak_memory_gb": summary["peak_memory_gb"], "peak_memory_kind": summary["peak_memory_kind"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "effective_batch": summary["effective_batch"], "wall_s_including_build": time.time() - t0,
        "overrides": args.overrides,
        # with export=merged: the merge runs in CPU memory, so this GPU peak should stay near the 4-bit model's size
        "export_runtime_s": summary.get("export_runtime_s"), "export_peak_memory_gb": summary.get("export_peak_memory_gb"),
        "merge_base": summary.get("merge_base"), "merge_mean_kl": summary.get("merge_mean_kl"),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(f"{k:>40}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
