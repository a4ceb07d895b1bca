"""`plan` against peak-memory and speed figures other projects published, each with the setting it was measured in.

    python scripts/plan_vs_published.py --out scripts/bench_results/plan_vs_published.md    # (and .json beside it)

Each point names its project, where the figure was published and how it was measured (PyTorch's allocated or reserved
peak, memory resident after the forward, the longest sequence that fit a card), and the plan overrides that describe
its setting: model, quantization, LoRA rank and targets, micro-batch, sequence, checkpointing, optimizer, attention
and loss. Where the project's stack differs from ours in a way plan has no key for, the point says so ("differs").
Offline: the architectures are the shipped presets (finetune/assets/arch/); no weights, no GPU.

Errors are plan / published - 1 of memory in GiB; for a published longest sequence, of plan's peak at that length
against the card's memory (the published length is where the card ran out), with plan.solve=max_seq's own answer
beside it. Speed points compare plan's tokens/s with the measured ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GB = 1e9 / 2**30  # GiB per GB

UNSLOTH = ("unsloth", "https://github.com/unslothai/unsloth (README, 'Llama 3.1 (8B) max. context length', Hugging Face "
                      "+ FA2 column; Llama 3.3 (70B) table of unsloth.ai/blog/llama3-3)")
# Llama 3.1 8B Instruct, 4-bit QLoRA on all linear layers, rank 32, batch 1, sequences padded to the length, FlashAttention-2
UNSLOTH_8B = ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct", "quant=nf4", "lora.r=32", "lora.alpha=32",
              "lora.dropout=0", "train.micro_batch_size=1", "train.gradient_checkpointing=true",
              "train.optim=adamw_8bit", "model.attn_implementation=flash_attention_2", "plan.loss=full"]
UNSLOTH_DIFFERS = "transformers, TRL and PEFT of Dec 2024 (the stack terms added)"

LITGPT = ("LitGPT", "https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md (1 x A100 40GB, "
                    "torch.cuda.max_memory_allocated in GB)")
# finetune/lora.py of Oct 2023: LoRA r=8 on the query and value projections, bf16-true, AdamW, no checkpointing, the
# longest Alpaca row (1304 Llama-2 tokens) as the peak, lm_head and loss in 128-token chunks
LITGPT_LORA = ["lora.r=8", "lora.alpha=16", "lora.dropout=0.05", "lora.target_modules=[q_proj,v_proj]",
               "train.gradient_checkpointing=false", "train.optim=adamw_torch", "data.max_length=1304",
               "train.grad_accum=1", "plan.loss=logits16"]
LITGPT_DIFFERS = "LitGPT's own Llama (fused qkv), LoRA weights and AdamW states in bf16"
# generate.py: a short prompt and 50 new tokens, the KV cache sized for them
LITGPT_INFER = ["data.max_length=64", "train.micro_batch_size=1"]

TORCHTUNE = ("torchtune", "https://github.com/pytorch/torchtune (README, 'Memory and training speed', Sep 2024)")
# llama3_1/8B_(q)lora_single_device: LoRA r=8 on q, v, output and the MLP, activation checkpointing, AdamW, 8 chunks of
# the output in the loss, batch 2 of packed 2048-token sequences, torch.compile
TORCHTUNE_8B = ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                "lora.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "train.micro_batch_size=2",
                "train.grad_accum=1", "data.max_length=2048", "data.packing=true", "train.gradient_checkpointing=true",
                "train.optim=adamw_torch", "plan.loss=logits16"]
TORCHTUNE_DIFFERS = "torchao's NF4 and torchtune's own Llama; whether the README's peak is allocated or reserved is unstated"

TRANSFORMERS = ("transformers", "https://github.com/huggingface/transformers/pull/48444 (memory resident after the "
                                "forward, Qwen3 config, bf16, H100)")

PEFT = ("PEFT", "https://github.com/huggingface/peft (examples comparing torchtune and PEFT, Llama 3 8B Instruct on an "
                "RTX 4090, bitsandbytes NF4 with double quant, activation checkpointing off)")


def point(project, kind, label, overrides, published, gpu="a100-80gb", differs="", mode="train", stack=(),
          calibrates=True):
    """`stack`: the names of STACK terms the project's software held that ours does not (added to plan's figure);
    `calibrates`: a speed point comparable with ours."""
    return {"project": project[0], "source": project[1], "kind": kind, "label": label, "overrides": overrides,
            "published": published, "gpu": gpu, "differs": differs, "mode": mode, "stack": list(stack),
            "calibrates": calibrates}


# What other stacks held that ours does not, in bytes, from the architecture and the tokens of a micro-batch: each is a
# documented behaviour of that software, not a fitted number.
STACK = {
    # PEFT's prepare_model_for_kbit_training (which TRL's SFTTrainer called for a quantized model until 2025) casts
    # every 16-bit weight the quantization left (embeddings, lm_head, norms) to fp32: 2 more bytes each
    "fp32 embeddings, lm_head and norms (prepare_model_for_kbit_training)": lambda arch, tokens: 2 * arch.other_params,
    # transformers' loss before 4.48 shifted the fp32 logits with a contiguous copy: 4 more bytes per word and token
    "the shifted fp32 copy of the logits (transformers' loss before 4.48)": lambda arch, tokens: 4 * arch.vocab * tokens,
    # bitsandbytes 0.41's 4-bit matmul saved its input for the backward pass (0.50 saves none): the MLP's input, the
    # down projection's input and LitGPT's copy of the attention output, per token and layer
    "bitsandbytes 0.41 saving each 4-bit layer's input": lambda arch, tokens: (
        2 * (2 * arch.hidden + arch.intermediate) * arch.layers * tokens),
}
UNSLOTH_STACK = list(STACK)[:2]


POINTS = [
    *[point(UNSLOTH, "max_seq", f"Llama 3.1 8B QLoRA r32, HF + FA2, {gb} GB card", UNSLOTH_8B, seq, gpu, UNSLOTH_DIFFERS,
            stack=UNSLOTH_STACK)
      for gb, gpu, seq in [(12, "rtx3060", 932), (16, "rtx4060ti", 2551), (24, "rtx4090", 5789), (40, "a100-40gb", 12264),
                           (48, "a6000", 15502), (80, "a100-80gb", 28454)]],
    point(UNSLOTH, "max_seq", "Llama 3.3 70B QLoRA r32, HF + FA2, 80 GB card",
          ["model.name_or_path=meta-llama/Llama-3.3-70B-Instruct", *UNSLOTH_8B[1:]], 6916, "a100-80gb", UNSLOTH_DIFFERS,
          stack=UNSLOTH_STACK),
    *[point(LITGPT, "peak_allocated", f"Llama 2 {size} LoRA r8 q,v, {quant}, micro-batch {mb}",
            [f"model.name_or_path=meta-llama/Llama-2-{size.lower()}-hf", f"quant={q}",
             f"quant.double_quant={'true' if dq else 'false'}", f"train.micro_batch_size={mb}", *LITGPT_LORA],
            gb * GB, "a100-40gb", LITGPT_DIFFERS, stack=[list(STACK)[2]] if q == "nf4" else [])
      for size, quant, q, dq, mb, gb in [("7B", "bf16", "none", False, 1, 21.30), ("7B", "bf16", "none", False, 2, 29.07),
                                         ("7B", "bnb.nf4", "nf4", False, 1, 14.14), ("7B", "bnb.nf4-dq", "nf4", True, 1, 13.84),
                                         ("13B", "bf16", "none", False, 1, 38.12), ("13B", "bnb.nf4", "nf4", False, 1, 23.14),
                                         ("13B", "bnb.nf4-dq", "nf4", True, 1, 22.55)]],
    *[point(LITGPT, "peak_allocated", f"Llama 2 {size} inference, {quant}",
            [f"model.name_or_path=meta-llama/Llama-2-{size.lower()}-hf", f"quant={q}",
             f"quant.double_quant={'true' if dq else 'false'}", *LITGPT_INFER],
            gb * GB, "a100-40gb", "LitGPT's own Llama and generate loop", mode="inference")
      for size, quant, q, dq, gb in [("7B", "bf16", "none", False, 13.52), ("7B", "bnb.nf4", "nf4", False, 4.57),
                                     ("7B", "bnb.nf4-dq", "nf4", True, 4.26), ("13B", "bf16", "none", False, 26.21),
                                     ("13B", "bnb.nf4", "nf4", False, 8.32), ("13B", "bnb.nf4-dq", "nf4", True, 7.72),
                                     ("70B", "bnb.nf4-dq", "nf4", True, 37.21)]],
    point(TORCHTUNE, "peak_allocated", "Llama 3.1 8B LoRA r8, bf16, batch 2 x 2048 packed", ["quant=none",
          "quant.double_quant=false", *TORCHTUNE_8B], 16.2, "rtx4090", TORCHTUNE_DIFFERS),
    point(TORCHTUNE, "peak_allocated", "Llama 3.1 8B QLoRA r8, batch 2 x 2048 packed", ["quant=nf4", *TORCHTUNE_8B],
          7.4, "rtx4090", TORCHTUNE_DIFFERS),
    *[point(TRANSFORMERS, "resident", f"activations after the forward, {layers} x {hidden} x {seq // 1024}k, "
            f"checkpointing{' + offload' if offload else ''}", [layers, hidden, seq, offload], mib / 1024, "h100",
            "the model's own forward only: no loss, no weights")
      for layers, hidden, seq, offload, mib in [(8, 1024, 8192, False, 194.1), (16, 1024, 16384, False, 644.2),
                                                (28, 2048, 32768, False, 4112.4), (8, 1024, 8192, True, 66.1),
                                                (16, 1024, 16384, True, 132.2), (28, 2048, 32768, True, 528.4)]],
]

TORCHTUNE_SPEED = ("not comparable: counting the recomputed forward, it would be {:.0%} of the 4090's dense bf16 peak "
                   "(165 TFLOP/s), more than any stack reaches; torchtune must count its tokens otherwise")
SPEED = [
    point(TORCHTUNE, "tokens_per_second", "Llama 3.1 8B LoRA r8, bf16, 1 x RTX 4090", ["quant=none",
          "quant.double_quant=false", *TORCHTUNE_8B], 3083, "rtx4090", TORCHTUNE_SPEED, calibrates=False),
    point(TORCHTUNE, "tokens_per_second", "Llama 3.1 8B QLoRA r8, 1 x RTX 4090", ["quant=nf4", *TORCHTUNE_8B], 2413,
          "rtx4090", TORCHTUNE_SPEED, calibrates=False),
    point(PEFT, "tokens_per_second", "Llama 3 8B Instruct QLoRA (PEFT + bitsandbytes), no checkpointing, 1 x RTX 4090",
          ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "quant=nf4", "train.gradient_checkpointing=false",
           "train.micro_batch_size=2", "data.max_length=1024"], 2300, "rtx4090",
          "batch and sequence not stated (FLOPs per token barely depend on them: 2 x 1024 assumed)"),
]


def plan_for(p: dict, extra=()) -> tuple[dict, float]:
    """plan's figures for the point's setting, and the GiB of the STACK terms it names (at the plan's tokens)."""
    from finetune.plan import GIB, load_arch, make_plan
    from finetune.registry import load_config

    cfg = load_config(["export=adapter", "tracking=none", *p["overrides"], *extra])
    plan = make_plan(cfg, gpu_name=p["gpu"], mode=p["mode"])
    arch, tokens = load_arch(cfg.model, cfg.lora), plan["setting"]["micro_batch"] * plan["setting"]["max_length"]
    return plan, sum(STACK[name](arch, tokens) for name in p["stack"]) / GIB


def resident(p: dict) -> float:
    """GiB resident after a checkpointed forward: each layer's saved input, and what the forward keeps outside the
    layers (the plan's activation terms, less the one layer recomputed in the backward); offloaded, only the latter."""
    from finetune.plan import GIB, Arch, activation_bytes_per_token

    layers, hidden, seq, offload = p["overrides"]
    arch = Arch(name="qwen3", layers=layers, hidden=hidden, intermediate=3 * hidden, kv_dim=hidden // 2, vocab=151936,
                gated_mlp=True, quantized_params=0, other_params=0)
    act = activation_bytes_per_token(arch, None, None, 2, True, "chunked")
    return seq * ((0 if offload else act["layers"]) + act["other"]) / GIB


def evaluate(p: dict) -> dict:
    """The point with plan's figure ("predicted", the STACK terms included), what it is compared with ("reference"),
    "error" (relative, stack terms included) and "raw_error" (plan alone)."""
    from finetune.plan import GPUS

    stack, extra = 0.0, ""
    if p["kind"] == "resident":
        predicted, reference = resident(p), p["published"]
    elif p["kind"] == "max_seq":
        plan, stack = plan_for(p, [f"data.max_length={p['published']}", "plan.solve=max_seq"])
        predicted, reference = plan["peak_gib"], GPUS[p["gpu"]].memory_gib
        extra = f"plan.solve=max_seq: {plan['solve']['max_seq']:,} tokens (ours)"
    elif p["kind"] == "tokens_per_second":
        plan, _ = plan_for(p)
        predicted, reference = plan["tokens_per_second"], p["published"]
        implied = p["published"] * plan["flops_per_token"] / (GPUS[p["gpu"]].tflops * 1e12)
        extra = f"plan at {plan['efficiency']:.0%} of the dense 16-bit peak; measured: {implied:.0%}"
        p = {**p, "differs": p["differs"].format(implied)}
    else:
        plan, stack = plan_for(p)
        predicted, reference = plan["peak_allocated_gib"], p["published"]
    if stack:
        extra = "; ".join(x for x in (extra, f"+{stack:.2f} GiB: {', '.join(p['stack'])}") if x)
    return {**p, "predicted": predicted + stack, "reference": reference, "error": (predicted + stack) / reference - 1,
            "raw_error": predicted / reference - 1, "extra": extra}


def summary(rows: list[dict], key: str = "error") -> dict:
    errors = [abs(r[key]) for r in rows]
    return {"points": len(rows), "projects": len({r["project"] for r in rows}),
            "median_abs_error": statistics.median(errors), "within_10pct": sum(e <= 0.10 for e in errors) / len(errors)}


def markdown(memory: list[dict], speed: list[dict]) -> str:
    def table(rows, unit):
        lines = ["| project | setting | published | plan | error | plan alone | note | what plan assumes differently |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            published = (f"{r['published']:,} tokens fit ({r['reference']:.1f} GiB card)" if r["kind"] == "max_seq"
                         else f"{r['published']:,.2f} {unit}")
            lines.append(f"| {r['project']} | {r['label']} ({r['kind'].replace('_', ' ')}) | {published} | "
                         f"{r['predicted']:,.2f} {unit} | {r['error']:+.1%} | {r['raw_error']:+.1%} | {r['extra']} | "
                         f"{r['differs']} |")
        return lines

    m, raw = summary(memory), summary(memory, "raw_error")
    used = [r for r in speed if r["calibrates"]]
    s = summary(used)
    out = ["# plan against published measurements", "",
           "Generated by `python scripts/plan_vs_published.py` (offline: the shipped architecture presets). Memory is "
           "GiB; a published longest sequence is compared as plan's peak at that length against the card. \"error\" "
           "includes the stack terms named in the note: what the project's software held that ours does not, each "
           "computed from the architecture (scripts/plan_vs_published.py STACK); \"plan alone\" leaves them out.", "",
           f"**Memory: {m['points']} points from {m['projects']} projects; median absolute error "
           f"{m['median_abs_error']:.1%}; {m['within_10pct']:.0%} within 10%** (plan alone: median "
           f"{raw['median_abs_error']:.1%}, {raw['within_10pct']:.0%} within 10%).", "",
           *table(memory, "GiB"), "",
           f"**Speed: {s['points']} comparable point(s); median absolute error {s['median_abs_error']:.1%}.** The other "
           "rows are shown but not comparable (see their note).", "", *table(speed, "tokens/s"), "", "Sources:", ""]
    out += [f"- {name}: {source}" for name, source in dict((r["project"], r["source"]) for r in memory + speed).items()]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "bench_results" / "plan_vs_published.md")
    args = ap.parse_args()
    memory, speed = [evaluate(p) for p in POINTS], [evaluate(p) for p in SPEED]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(memory, speed))
    args.out.with_suffix(".json").write_text(json.dumps({"memory": memory, "speed": speed, "memory_summary":
                                                         summary(memory), "speed_summary": summary(speed)}, indent=1))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
