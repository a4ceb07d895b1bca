"""Time and peak memory of making GGUF files of a 7B-architecture model on this machine, with llama.cpp's own tools.

    python scripts/bench_gguf.py --workdir /tmp/bench_gguf --out scripts/bench_results/gguf_7b_2cpu.json

A Llama-2-7B-shaped model (transformers' LlamaConfig defaults: 32 layers, width 4096, 6.7B parameters) with random
bf16 weights is written as safetensors shards (weights: random normal, 0.02 std; tokenizer: the demo's, the vocabulary
padded to 32000 by the converter). Each step then runs in a fresh process, its wall time and peak resident memory
(the child's max RSS; the parent stays small, the model being written by a child of its own) measured:
  copy      the safetensors files copied: the disk's floor for reading and writing that many bytes (the baseline)
  f16       llama.cpp's converter (finetune.gguf.convert): safetensors -> f16 GGUF
  q4_k_m    llama.cpp's quantizer (finetune.gguf.quantize): f16 GGUF -> q4_k_m
--layers and --hidden shrink the model for a quick try. Needs about 45 GB of free disk at 7B.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "finetune" / "assets" / "tiny_llama"


def build(folder: Path, layers: int, hidden: int) -> int:
    """A Llama of this shape with random bf16 weights, one safetensors shard per layer. Returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11008 // 4096,
                         num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 128, 1),
                         bos_token_id=0, eos_token_id=1, vocab_size=32000, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.empty(*shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(torch.bfloat16)

    i, inter, weight_map, total = 0, config.intermediate_size, {}, 0
    shards = [{"model.embed_tokens.weight": rand(32000, hidden)}]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shards.append({p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
                       p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                       p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                       p + "mlp.down_proj.weight": rand(hidden, inter),
                       p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rand(32000, hidden)})
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard}
        total += sum(t.numel() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


STEPS = {
    "copy": "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
    "f16": ("import sys; from pathlib import Path; from finetune.gguf import convert; "
            "convert(Path(sys.argv[1]), Path(sys.argv[2]), 'f16', None)"),
    "q4_k_m": ("import os, sys; from pathlib import Path; from finetune.gguf import quantize; "
               "quantize(Path(sys.argv[1]), Path(sys.argv[2]), 'q4_k_m', os.cpu_count())"),
}


def measure(step: str, source: Path, target: Path) -> dict:
    """One step in a fresh process: wall seconds and the process's peak RSS."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", STEPS[step], str(source), str(target)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{step} failed (status {status})")
    size = sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "output_gb": round(size / 1e9, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gguf"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("gguf_bench.json"))
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the child that writes the model
    args = ap.parse_args()
    if args.build_only:
        print(build(args.build_only, args.layers, args.hidden))
        return 0
    shutil.rmtree(args.workdir, ignore_errors=True)
    model = args.workdir / "model"
    start = time.perf_counter()
    # in a child: a parent holding the weights would lend each later child its memory (Linux counts the pages a
    # forked child shares before exec in its peak RSS)
    params = int(subprocess.run([sys.executable, __file__, "--build-only", str(model), "--layers", str(args.layers),
                                 "--hidden", str(args.hidden)], check=True, capture_output=True, text=True).stdout)
    report = {"cpus": os.cpu_count(), "layers": args.layers, "hidden": args.hidden, "params": params,
              "build_s": round(time.perf_counter() - start, 1), "steps": {}}
    report["steps"]["copy"] = measure("copy", model, args.workdir / "copy")
    shutil.rmtree(args.workdir / "copy")
    report["steps"]["f16"] = measure("f16", model, args.workdir / "model-f16.gguf")
    report["steps"]["q4_k_m"] = measure("q4_k_m", args.workdir / "model-f16.gguf", args.workdir / "model-q4_k_m.gguf")
    report["f16_over_copy"] = round(report["steps"]["f16"]["wall_s"] / report["steps"]["copy"]["wall_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{params / 1e9:.2f}B parameters, {os.cpu_count()} CPUs")
    print(f"{'step':<8} {'wall s':>8} {'peak RSS GB':>12} {'output GB':>10}")
    for step, r in report["steps"].items():
        print(f"{step:<8} {r['wall_s']:>8} {r['peak_rss_gb']:>12} {r['output_gb']:>10}")
    print(f"f16 conversion takes {report['f16_over_copy']}x the time of copying the weights; figures in {args.out}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
