"""`plan`: peak GPU memory, tokens/s and GPU-hours of a recipe on a named GPU, without loading weights.

The architecture comes from config.json (shipped presets for every recipe's base, else AutoConfig); the
model is built on PyTorch's meta device, which gives every weight's shape and allocates nothing. Memory
is added up per component, the way our pipeline really stores it:

- base weights: NF4 with double quantization is 4 bits per weight plus an 8-bit absmax per block of 64
  and an fp32 scale per 256 blocks (4 + 8/64 + 32/16384 = 4.127 bits); without double quantization an
  fp32 absmax per 64 (4.5 bits); LLM.int8 one byte; 16/32-bit the compute dtype. Embeddings, lm_head,
  norms and biases stay in the compute dtype.
- LoRA weights, their gradients and optimizer states (TRL keeps adapters of a quantized base in bf16;
  PEFT keeps them in fp32 otherwise). bitsandbytes' 8-bit AdamW keeps two 1-byte states per parameter for
  tensors of 4096+ elements (32-bit below that). Full fine-tuning trains every weight: in fp32 under 16-bit
  autocast by default (train.master_weights=fp32), or in the compute dtype (16bit, with Kahan buffers for
  adamw_kahan).
- activations per token and layer, measured with autograd's saved-tensor hooks on Llama layers (see
  activation_bytes_per_token and tests/unit/test_plan.py): what a frozen layer saves, what LoRA's adapters add
  (by their dtype, targets and dropout), or every linear input for full fine-tuning; checkpointing keeps only each
  layer's input (h) plus one layer recomputed at a time; eager attention its scores. The logits and the loss as the
  installed TRL computes them (plan.loss). Offloaded activations, paged optimizer states and offloaded layers are
  counted off the card, and what crosses PCIe slows the step.
- what a CUDA GPU holds beyond the saved tensors (dropout_held), and LLM.int8's inputs kept past checkpointing,
  both measured on an H200 (scripts/bench_results/h200.md).
- PyTorch's allocator: its fragmentation by quantization (FRAGMENTATION, measured on the H200) plus 0.25 GiB of
  workspaces; the CUDA context (0.5 GiB) is not in torch.cuda.max_memory_reserved but is on the card.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig
from finetune.errors import UserError, closest

log = logging.getLogger("finetune")
GIB = 2**30
CONTEXT_GIB = 0.5         # CUDA context + cuBLAS handles: on the card, outside PyTorch's allocator
WORKSPACE_GIB = 0.25      # cuBLAS/cuDNN workspaces and small buffers inside the allocator
# reserved / allocated - 1 of a training loop, by quantization: measured on an H200 (scripts/bench_results/h200.md:
# 7B runs of NF4, LLM.int8 and a 16-bit base; int8's many transient casts fragment the cache most)
FRAGMENTATION = {"nf4": 0.13, "int8": 0.45, "none": 0.03}
AUTO_FIT_USE = 0.90       # auto_fit leaves 10% of the card free: published peaks sat up to 10% above plan's
#                           (scripts/bench_results/plan_vs_published.md)
# Share of the dense 16-bit peak reached, counting the recomputed forward (dequantization, kernels): nf4 from the one
# comparable published measurement (PEFT + bitsandbytes QLoRA of an 8B on an RTX 4090, 2300 tokens/s:
# scripts/bench_results/plan_vs_published.md); int8 and 16-bit scaled by the same factor from the earlier
# 0.12 / 0.30 / 0.40, until the GPU evidence run (scripts/gpu_evidence.sh) measures them.
EFFICIENCY = {"nf4": 0.42, "int8": 0.17, "none": 0.56}
# Hopper (H100, H200) reaches a smaller share of its much higher peak with the same kernels: QLoRA of Llama-2-7B on an
# H200 (our path: padding-free, Liger, no checkpointing, micro-batch 4) trained 6,270 tokens/s, 0.42 of what 0.42 of
# the peak would give (scripts/bench_results/h200.md)
HOPPER_REACH = 0.42
ARCH_DIR = Path(__file__).resolve().parent / "assets" / "arch"


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float   # as torch.cuda.get_device_properties reports it
    bf16: bool
    tflops: float       # dense 16-bit tensor-core TFLOP/s (bf16, or fp16 where there is no bf16)
    bandwidth_gbs: float
    reach: float = 1.0  # the share of EFFICIENCY this GPU's kernels reach (HOPPER_REACH on Hopper)


GPUS = {
    "t4": GPU("NVIDIA T4 16GB", 14.6, False, 65, 320),
    "rtx3060": GPU("NVIDIA GeForce RTX 3060 12GB", 11.8, True, 25.6, 360),
    "rtx4060ti": GPU("NVIDIA GeForce RTX 4060 Ti 16GB", 15.6, True, 44, 288),
    "rtx3090": GPU("NVIDIA GeForce RTX 3090 24GB", 23.7, True, 71, 936),
    "rtx4090": GPU("NVIDIA GeForce RTX 4090 24GB", 23.6, True, 165, 1008),
    "l4": GPU("NVIDIA L4 24GB", 22.0, True, 121, 300),
    "a10": GPU("NVIDIA A10 24GB", 22.0, True, 125, 600),
    "a6000": GPU("NVIDIA RTX A6000 48GB", 47.5, True, 155, 768),
    "a100-40gb": GPU("NVIDIA A100 40GB", 39.4, True, 312, 1555),
    "a100-80gb": GPU("NVIDIA A100 80GB", 79.1, True, 312, 2039),
    "h100": GPU("NVIDIA H100 80GB", 79.1, True, 989, 3350, HOPPER_REACH),
    "h200": GPU("NVIDIA H200 141GB", 139.8, True, 989, 4800, HOPPER_REACH),
}


def local_gpu() -> GPU:
    """plan.gpu=auto: the local CUDA GPU, its speed taken from the closest preset by name."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"plan.gpu=auto reads the local GPU, and this machine has none: name one with plan.gpu=NAME "
                        f"({', '.join(GPUS)}).")
    props = torch.cuda.get_device_properties(0)
    name, memory = props.name, props.total_memory / GIB
    compact = name.lower().replace(" ", "").replace("-", "")
    patterns = [("h200", "h200"), ("h100", "h100"), ("a100", "a100-80gb" if memory > 50 else "a100-40gb"),
                ("a6000", "a6000"), ("a10", "a10"), ("l4", "l4"), ("4090", "rtx4090"), ("3090", "rtx3090"),
                ("4060ti", "rtx4060ti"), ("3060", "rtx3060"), ("t4", "t4")]
    ref = next((GPUS[key] for pattern, key in patterns if pattern in compact), None)
    if ref is None:
        log.warning("plan: %s is not among the presets; its speed is taken as 100 TFLOP/s (memory is read from the "
                    "GPU itself).", name)
    return GPU(name, memory, torch.cuda.is_bf16_supported(), ref.tflops if ref else 100.0,
               ref.bandwidth_gbs if ref else 1000.0, ref.reach if ref else 1.0)


def pick_gpu(name: str) -> GPU:
    if name == "auto":
        return local_gpu()
    if name not in GPUS:
        raise UserError(f"plan.gpu={name} is not a preset: choose one of auto, {', '.join(GPUS)}.{closest(name, GPUS)}")
    return GPUS[name]


def planned_gpu(name: str, what: str) -> Optional[str]:
    """plan.gpu for figures beside a measurement (prune.json, `eval compare=`): a preset, or for auto the local GPU;
    None, with a line naming the key, where plan.gpu=auto and this machine has no GPU."""
    import torch

    if name == "auto" and not torch.cuda.is_available():
        log.info("%s: no GPU here to plan for; name one with plan.gpu=NAME (%s)", what, ", ".join(GPUS))
        return None
    pick_gpu(name)  # a name that is not a preset: its error now
    return name


# ---- architecture -------------------------------------------------------------------------------

@dataclass
class Arch:
    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int                 # key/value width: kv heads x head dim
    vocab: int
    gated_mlp: bool
    quantized_params: int       # the decoder layers' Linear weights: what bitsandbytes quantizes
    other_params: int           # embeddings, lm_head, norms, biases: kept in the compute dtype
    linears: dict = field(default_factory=dict)  # module name suffix -> [(in, out), ...]: LoRA targets
    max_position: Optional[int] = None
    fused: dict = field(default_factory=dict)    # fused experts' 3-D weights: name in a layer -> [(experts, in, out)]
    active_experts: float = 1.0                  # the share of the experts each token runs through (top-k / experts)
    adapted: list = field(default_factory=list)  # weights LoRA adapts as parameters: [(shape, rank / lora.r)]
    heads: int = 1              # attention heads (eager attention keeps heads x seq x seq scores per layer)
    sdpa: bool = True           # transformers has SDPA attention for it (else auto means eager)

    @property
    def fused_params(self) -> int:
        return sum(e * a * b for shapes in self.fused.values() for e, a, b in shapes)

    @property
    def active_expert_params(self) -> float:
        return self.active_experts * self.fused_params

    @property
    def params(self) -> int:
        return self.quantized_params + self.other_params


def preset_path(name: str) -> Path:
    return ARCH_DIR / (name.replace("/", "--") + ".json")


def arch_config(model):
    """transformers config of model.name_or_path: a shipped preset, else config.json (local or Hub)."""
    from transformers import AutoConfig

    preset = preset_path(model.name_or_path)
    if preset.is_file():
        d = json.loads(preset.read_text())
        d.pop("_name_or_path", None)
        d.pop("architectures", None)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                          trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        presets = ", ".join(p.stem.replace("--", "/") for p in sorted(ARCH_DIR.glob("*.json")))
        raise UserError(f"model.name_or_path={model.name_or_path}: its config.json could not be read ({first}). "
                        f"Give a local folder, a Hub id (needs the network or the HF cache), or one with a shipped "
                        f"preset: {presets}.") from None


def meta_model(model):
    """(config, the model built on PyTorch's meta device): every module and weight shape, no memory used and no
    weight downloaded. Built once per model in a process (read it, never change it)."""
    return _meta_model(model.name_or_path, model.revision, model.trust_remote_code)


@functools.lru_cache(maxsize=16)
def _meta_model(name_or_path: str, revision: Optional[str], trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config import ModelConfig

    config = arch_config(ModelConfig(name_or_path=name_or_path, revision=revision, trust_remote_code=trust_remote_code))
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_arch(model, lora=None) -> Arch:
    """Weight shapes from the model built on the meta device: no memory, no download of weights; with `lora` (the
    LoraConfig), the weights it adapts as parameters, as PEFT will."""
    import torch

    from finetune.lora import adapted_parameters

    config, net = meta_model(model)
    head = net.get_output_embeddings()
    quantized, linears = 0, {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            quantized += module.weight.numel()
            linears.setdefault(name.split(".")[-1], []).append((module.in_features, module.out_features))
    total = sum(p.numel() for p in net.parameters())
    text = config.get_text_config()  # a vision-language model's (Gemma 3): the language model's shape
    get = lambda *keys: next((getattr(text, k) for k in keys if getattr(text, k, None)), None)  # noqa: E731
    experts, top_k = get("num_experts", "num_local_experts"), get("num_experts_per_tok", "top_k_experts")
    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "num_heads", "n_head")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    intermediate = get("intermediate_size", "n_inner") or 4 * hidden
    if experts and top_k:  # a token's MLP activations: those of the top-k experts (and a shared one) it runs through
        intermediate = top_k * (get("moe_intermediate_size") or intermediate) + (get("shared_expert_intermediate_size") or 0)
    return Arch(
        name=model.name_or_path, layers=get("num_hidden_layers", "num_layers", "n_layer"), hidden=hidden,
        intermediate=intermediate, kv_dim=kv_heads * head_dim, vocab=text.vocab_size, heads=heads,
        sdpa=getattr(net, "_supports_sdpa", True),
        gated_mlp="gate_proj" in linears or "w1" in linears and "w3" in linears or bool(experts),
        quantized_params=quantized, other_params=total - quantized, linears=linears,
        max_position=get("max_position_embeddings", "n_positions"), fused=fused_weights(net),
        active_experts=top_k / experts if experts and top_k else 1.0,
        adapted=[(shape, rank) for _, shape, rank in adapted_parameters(lora, net)] if lora is not None else [],
    )


def within_layer(name: str) -> str:
    """model.layers.3.mlp.experts.down_proj -> mlp.experts.down_proj"""
    import re

    return re.sub(r"^.*?layers\.\d+\.", "", name)


def fused_weights(net) -> dict:
    """The fused experts of a mixture-of-experts model (transformers 5 stores them as 3-D parameters, which
    bitsandbytes does not quantize and LoRA adapts as parameters: finetune.lora.adapted_parameters): {name within a
    layer: [shape per layer]}."""
    import torch

    fused = {}
    for module_name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
            continue  # a convolution's 3-D kernel (Qwen3.5's linear attention) is no expert
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                fused.setdefault(within_layer(f"{module_name}.{name}"), []).append(tuple(p.shape))
    return fused


# ---- memory -------------------------------------------------------------------------------------

def weight_bits(method: str, double_quant: bool, dtype_bytes: int) -> float:
    """Bits per quantized weight, scales included."""
    if method == "nf4":
        return 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4 + 32 / 64
    if method == "int8":
        return 8.0
    return 8.0 * dtype_bytes


def targeted(arch: Arch, targets: list[str]) -> dict:
    """{module name suffix: [(in, out) per layer]} of the Linear layers LoRA adapts."""
    if list(targets) == ["all-linear"]:
        return dict(arch.linears)
    return {name: shapes for name, shapes in arch.linears.items() if name in targets}


def lora_targets(arch: Arch, targets: list[str]) -> list[tuple[int, int]]:
    return [shape for shapes in targeted(arch, targets).values() for shape in shapes]


def lora_shapes(arch: Arch, lora, r: int) -> list[tuple[int, int]]:
    """The adapter's matrices: A (r x in) and B (out x r) per targeted linear layer; per weight adapted as a parameter
    (PEFT's ParamWrapper), at its own rank: A (rank*E x in) and B (out x rank*E) for E fused experts, or A and B of a
    2-D weight."""
    shapes = lora_targets(arch, lora.target_modules)
    out = [(r, a) for a, _ in shapes] + [(b, r) for _, b in shapes]
    for shape, rank in arch.adapted:
        experts, a, b = shape if len(shape) == 3 else (1, *shape)
        k = round(r * rank) * experts
        out += [(k, a), (b, k)]
    return out


def optimizer_bytes(optim: str, shapes: list[tuple[int, int]], param_bytes: int) -> float:
    """Optimizer state of trainable matrices of these (rows, cols) shapes."""
    total = 0.0
    for rows, cols in shapes:
        n = rows * cols
        if optim in ("adamw_8bit", "paged_adamw_8bit"):
            total += 2 * n if n >= 4096 else 8 * n  # bitsandbytes keeps small tensors' state in 32-bit
        elif optim == "paged_adamw_32bit":
            total += 8 * n
        elif optim == "adamw_kahan":  # two states in the parameter's dtype, and a Kahan buffer beside 16-bit ones
            total += (2 if param_bytes >= 4 else 3) * param_bytes * n
        elif optim == "adafactor":
            total += 4 * (rows + cols)  # factored second moment, no first moment
        else:  # adamw_torch: two states in the parameter's dtype
            total += 2 * param_bytes * n
    return total


LOSSES = {"full": "full fp32 logits (transformers' loss)", "logits16": "16-bit logits, fp32 loss a chunk at a time",
          "chunked": "no whole logits (TRL's fused LM head, Liger)"}
LOSS_TILE_TOKENS, LOSS_TILE_VOCAB = 4096, 32768  # TRL's fused LM head: tiles of the logits it computes at a time


ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "q", "k", "v"}
MLP_INPUT = {"gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "c_fc", "fc1", "dense_h_to_4h"}
ATTENTION_OUTPUT = {"o_proj", "out_proj", "dense", "c_proj", "o"}  # its input is the attention's output, saved anyway


def lora_saved(arch: Arch, lora, r: int, adapters_16bit: bool) -> float:
    """Elements per token and layer that LoRA adds to what a frozen layer saves (measured with autograd's saved-tensor
    hooks, tests/unit/test_plan.py). 16-bit adapters (TRL's for a quantized base) save each distinct input once, and
    the attention output not at all (the attention saved it); fp32 adapters (PEFT's on a 16-bit base) save their own
    fp32 copy of every input; dropout gives each adapter its own copy (and its mask)."""
    targets = {name: shapes[0][0] for name, shapes in targeted(arch, lora.target_modules).items()}
    dropout = lora.dropout > 0
    if not adapters_16bit:
        return sum((4 if dropout else 2) * width + 2 * r for width in targets.values())
    if dropout:
        return sum(2 * width + r for width in targets.values())
    distinct = {"attention" if name in ATTENTION_INPUT else "mlp" if name in MLP_INPUT else name: width
                for name, width in targets.items() if name not in ATTENTION_OUTPUT}
    return sum(distinct.values()) + r * len(targets)


def activation_bytes_per_token(arch: Arch, lora, r: Optional[int], dtype_bytes: int, checkpointing: bool,
                               loss: str = "full", attention: str = "sdpa", seq: int = 0,
                               adapters_16bit: bool = False) -> dict:
    """Bytes per token kept for the backward pass: {"layers", "recompute", "other", "logits"}; `lora` is the
    LoraConfig, r its rank (None: full fine-tuning), `seq` the sequence length (eager attention's scores grow with it).

    A decoder layer whose weights are frozen saves 6h + 2kv + 3i values per token (the norms' inputs, the rotated
    queries and keys, the attention's output, the MLP's activations; a frozen linear layer keeps none of its input);
    LoRA adds lora_saved(); full fine-tuning adds every linear layer's input (4h + i). Checkpointing keeps each layer's
    input and recomputes one layer at a time.
    The logits and the loss, as `loss` computes them (plan.loss):
    - full: the 16-bit logits, their fp32 copy, the saved log-softmax and its gradient (transformers' loss);
    - logits16: the 16-bit logits kept, the fp32 loss computed a chunk at a time (torchtune's chunked loss);
    - chunked: the logits never exist whole (TRL's fused LM head, Liger's fused cross-entropy): per token the
      hidden state it saves, its fp32 gradient and a few fp32 statistics; the tile it computes in is a fixed row.
    Attention: sdpa and flash keep the per-head log-sum-exp; eager keeps every head's softmax over the sequence
    (heads x seq 16-bit values per token and layer)."""
    h, i, kv, p = arch.hidden, arch.intermediate, arch.kv_dim, dtype_bytes
    scores = arch.heads * seq * p if attention == "eager" else arch.heads * 4
    added = 4 * h + i if r is None else lora_saved(arch, lora, r, adapters_16bit)
    layer = p * (6 * h + 2 * kv + (3 if arch.gated_mlp else 2) * i + added) + scores
    kept = arch.layers * (p * h if checkpointing else layer)
    logits = {"full": arch.vocab * (2 * p + 8), "logits16": arch.vocab * (p + 0.5), "chunked": 8 * h + 40}[loss]
    return {"layers": kept, "recompute": layer if checkpointing else 0, "other": 4 * p * h, "logits": logits}


@dataclass
class Setting:
    """The knobs plan varies: what the run would use."""
    method: str
    double_quant: bool
    lora: bool
    r: int
    micro_batch: int
    grad_accum: int
    max_length: int
    checkpointing: bool
    optim: str
    master_weights: str = "fp32"  # full fine-tuning: fp32 master weights (mixed precision) or 16-bit ones
    loss: str = "full"            # how the logits and the loss are computed (activation_bytes_per_token)
    attention: str = "sdpa"       # sdpa, flash or eager
    padded: bool = False          # rows padded to the micro-batch's longest (SDPA then takes a seq x seq mask)
    activation_offloading: bool = False
    offload: str = "none"         # inference: model.offload
    max_memory_gpu: Optional[float] = None  # bytes, model.max_memory.gpu
    max_memory_cpu: Optional[float] = None
    gpus: int = 1               # processes of an accelerate launch, one per GPU
    sharding: str = "ddp"       # with gpus > 1: ddp (replicas) or fsdp (shards)
    pairs: bool = False         # preference pairs (train.objective=dpo|orpo): a row is two sequences
    reference: bool = False     # a reference forward of both (dpo)

    @property
    def sequences(self) -> int:
        """Sequences a micro-batch runs through the model: a preference pair's chosen and rejected answers each
        follow its prompt."""
        return self.micro_batch * (2 if self.pairs else 1)

    @property
    def shards(self) -> int:
        """How many GPUs share each weight, gradient and optimizer state."""
        return self.gpus if self.sharding == "fsdp" else 1


def setting_of(cfg: FinetuneConfig, arch: Optional[Arch] = None) -> Setting:
    t = cfg.train
    attention = {"flash_attention_2": "flash", "eager": "eager", "sdpa": "sdpa"}.get(
        cfg.model.attn_implementation, "sdpa" if arch is None or arch.sdpa else "eager")
    return Setting(cfg.quant.method, cfg.quant.double_quant, cfg.lora.enabled, cfg.lora.r, t.micro_batch_size,
                   t.grad_accum, cfg.data.max_length, t.gradient_checkpointing, t.optim,
                   master_weights=t.master_weights, loss=loss_of(cfg), attention=attention,
                   padded=cfg.train.objective != "sft" or (not cfg.data.packing and cfg.data.padding_free is False),
                   activation_offloading=t.activation_offloading,
                   offload=cfg.model.offload, max_memory_gpu=size(cfg.model.max_memory.gpu),
                   max_memory_cpu=size(cfg.model.max_memory.cpu), gpus=cfg.plan.gpus, sharding=cfg.plan.sharding,
                   pairs=cfg.train.objective != "sft", reference=cfg.train.objective == "dpo")


def loss_of(cfg: FinetuneConfig) -> str:
    """plan.loss=auto: what this installation computes. TRL's SFTTrainer computes the loss through its fused LM head
    (tiles of the logits, never all of them) since its 1.x releases, Liger's kernels through their fused
    cross-entropy; before, transformers' loss over the whole fp32 logits. Distillation (distill.teacher) computes the
    student's whole logits: its loss compares them with the teacher's top-k; so does TRL's ORPO (its log-softmax over
    them)."""
    if cfg.plan.loss != "auto":
        return cfg.plan.loss
    if cfg.distill.teacher or cfg.train.objective == "orpo":
        return "full"
    return "chunked" if cfg.train.liger_kernel or trl_fused_head() else "full"


@functools.lru_cache(maxsize=1)
def trl_fused_head() -> bool:
    """Whether the installed TRL's SFTTrainer adds its fused LM head (read from its source: importing TRL costs
    seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    source = Path(spec.origin).parent / "trainer" / "sft_trainer.py" if spec and spec.origin else None
    return bool(source and source.is_file() and "add_fused_lm_head(" in source.read_text())


def size(text: Optional[str]) -> Optional[float]:
    """Bytes of a size as accelerate reads it (10GiB, 500MB), or None."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    return float(convert_file_size_to_int(text))


def memory(arch: Arch, cfg: FinetuneConfig, s: Setting, dtype_bytes: int, mode: str = "train") -> list[tuple[str, float]]:
    """[(component, bytes)] of the peak, in order; the last two are the allocator and the CUDA context."""
    p, n_sh = dtype_bytes, s.shards
    mixed = mode == "train" and not s.lora and s.master_weights == "fp32" and p < 4
    w = 4 if mixed else p  # bytes of a stored weight: fp32 masters under 16-bit autocast, else the compute dtype
    sharded = f", 1/{n_sh} per GPU" if n_sh > 1 else ""
    layer_bytes = arch.quantized_params * weight_bits(s.method, s.double_quant, w) / 8
    rows = [(f"base weights: {arch.quantized_params / 1e9:.2f}B in {describe_quant(s, w)}"
             f"{' (master weights, 16-bit autocast)' if mixed else ''}{sharded}", layer_bytes / n_sh),
            (f"embeddings, lm_head, norms{', experts' if arch.fused else ''}: {arch.other_params / 1e9:.2f}B in "
             f"{8 * w}-bit{sharded}",
             arch.other_params * w / n_sh)]
    if n_sh > 1:  # FSDP gathers a layer while it computes (and prefetches the next); the root unit stays whole
        experts = arch.fused_params  # in the decoder layers, gathered with them
        rows.append(("FSDP gathered: 2 decoder layers + embeddings, lm_head, norms",
                     2 * (layer_bytes + experts * p) / arch.layers + (arch.other_params - experts) * p))
    if mode == "inference":
        tokens = s.micro_batch * s.max_length
        rows.append((f"KV cache: {s.micro_batch} x {s.max_length} tokens", tokens * 2 * arch.layers * arch.kv_dim * p))
        rows.append(("activations of one layer over the prompt", tokens * p * (4 * arch.hidden + 2 * arch.intermediate)))
        rows.append(("logits of the last position", s.micro_batch * arch.vocab * 4))
    else:
        if s.lora:
            adapter = lora_shapes(arch, cfg.lora, s.r)
            n = sum(x * y for x, y in adapter)
            b = 2 if adapters_16bit(s, p) else 4
            rows += [(f"LoRA weights: {n / 1e6:.1f}M, r={s.r}, {8 * b}-bit{sharded}", n * b / n_sh),
                     (f"LoRA gradients{sharded}", n * b / n_sh)]
            states, grads = optimizer_bytes(s.optim, adapter, b), n * b
            if arch.adapted:  # PEFT's ParamWrapper materializes W + BA in every forward; autograd keeps it and its gradient
                per_layer = sum(math.prod(shape) for shape, _ in arch.adapted) / arch.layers * p
                kept = 1 if s.checkpointing else arch.layers
                rows.append((f"expert weights + LoRA, materialized: {kept} layer(s) + grad",
                             per_layer * (kept + 1)))
        else:
            n = arch.params
            rows.append((f"gradients of all {n / 1e9:.2f}B weights, {8 * w}-bit{sharded}", n * w / n_sh))
            if mixed and s.grad_accum > 1:  # autocast's cache of 16-bit weight copies, beside the accumulated gradients
                rows.append((f"{8 * p}-bit weight copies autocast keeps through a forward{sharded}", n * p / n_sh))
            matrices = [shape for shapes in arch.linears.values() for shape in shapes]
            states = optimizer_bytes(s.optim, matrices, w) + optimizer_bytes(s.optim, [(1, arch.other_params)], w)
            grads = n * w
        rows.append((f"optimizer states: {s.optim}{sharded}", states / n_sh))
        if s.gpus > 1 and n_sh == 1:  # DDP all-reduces the gradients through buckets: one more copy of them
            rows.append(("DDP gradient buckets (a copy of the gradients)", grads))
        act = activations(arch, cfg, s, p)
        tokens = s.sequences * s.max_length
        kept = act["layers"] if not s.activation_offloading else min(act["layers"], 2 * act["layers"] / arch.layers)
        pairs = f" ({s.micro_batch} pair{'s' * (s.micro_batch > 1)}: chosen and rejected)" if s.pairs else ""
        rows.append((f"activations: {s.sequences}{pairs} x {s.max_length} tokens, checkpointing "
                     f"{'on' if s.checkpointing else 'off'}"
                     + (", offloaded (on the GPU: the two layers in flight)" if s.activation_offloading else ""),
                     tokens * (kept + act["recompute"] + act["other"])))
        rows.append((f"logits and loss: vocabulary {arch.vocab}, {LOSSES[s.loss]}", tokens * act["logits"]))
        if s.loss == "chunked":
            rows.append(("loss tile: the logits of up to 4096 tokens x 32768 words at a time",
                         min(tokens, LOSS_TILE_TOKENS) * min(arch.vocab, LOSS_TILE_VOCAB) * p))
        if s.attention == "eager":
            rows.append(("eager attention: one layer's fp32 softmax over the sequence",
                         s.sequences * arch.heads * s.max_length ** 2 * 4))
        if s.padded and s.attention == "sdpa":
            rows.append(("SDPA's attention mask of the padded batch", s.sequences * s.max_length ** 2))
    return rows


def adapters_16bit(s: Setting, p: int) -> bool:
    """TRL keeps the adapters of a quantized base in bf16; PEFT keeps them in fp32 otherwise."""
    return s.method != "none" and p == 2


def with_overhead(rows: list, method: str) -> list:
    """The rows, then the allocator's share and the CUDA context: the last two rows of every plan."""
    subtotal, share = sum(b for _, b in rows), FRAGMENTATION[method]
    return rows + [(f"allocator: {share:.0%} fragmentation + workspaces", share * subtotal + WORKSPACE_GIB * GIB),
                   ("CUDA context (outside PyTorch's allocator)", CONTEXT_GIB * GIB)]


def activations(arch: Arch, cfg: FinetuneConfig, s: Setting, p: int) -> dict:
    """activation_bytes_per_token for this setting, as a CUDA GPU holds it (dropout_held). The Trainer runs a 16-bit
    model under 16-bit autocast, so fp32 adapters compute, and save, in 16 bits like TRL's bf16 ones. LLM.int8's
    matmul keeps its 16-bit input as an attribute of its autograd context, where checkpointing cannot drop it: the
    inputs of a layer's matmuls (3h + i) stay for every layer."""
    act = activation_bytes_per_token(arch, cfg.lora, s.r if s.lora else None, p, s.checkpointing, s.loss, s.attention,
                                     s.max_length, adapters_16bit=p == 2)
    held = dropout_held(arch, cfg.lora, p) if s.lora else 0.0
    int8_inputs = p * (3 * arch.hidden + arch.intermediate) if s.method == "int8" else 0
    return act | {"layers": act["layers"] + arch.layers * (int8_inputs + (0 if s.checkpointing else held)),
                  "recompute": act["recompute"] + (held if s.checkpointing else 0)}


def dropout_held(arch: Arch, lora, p: int) -> float:
    """Bytes per token and layer a CUDA GPU holds beyond autograd's saved tensors when LoRA has dropout: once more
    each adapter's dropped input and its mask. Measured on an H200 (torch 2.11, PEFT 0.21, bitsandbytes 0.50, TRL
    1.16; scripts/bench_results/h200.md): 2- and 6-layer cuts of Llama-2-7B, all-linear LoRA with dropout 0.05, NF4
    and 16-bit bases alike, held 111-117 KB per token and layer more than the saved tensors add up to (this gives
    107 KB); the published peaks of stacks without dropout need nothing of the kind (plan_vs_published.md). The
    cause is not pinned down: the next GPU run should repeat the depth cut with lora.dropout=0."""
    if lora.dropout <= 0:
        return 0.0
    return (p + 1) * sum(shapes[0][0] for shapes in targeted(arch, lora.target_modules).values())


def offloaded_activations(arch: Arch, cfg: FinetuneConfig, s: Setting, p: int) -> float:
    """train.activation_offloading: the bytes of a micro-batch's activations that wait in CPU RAM for the backward
    pass (every layer's; TRL keeps the two in flight on the GPU)."""
    return s.sequences * s.max_length * activations(arch, cfg, s, p)["layers"]


def place_layers(arch: Arch, s: Setting, p: int, gpu: GPU, rows: list) -> tuple[list, list, dict]:
    """model.offload for inference, as accelerate's device map does it (checked against infer_auto_device_map in the
    tests): the embeddings and norms stay on the GPU, and whole decoder layers fill what the GPU has left for weights
    (model.max_memory.gpu, else the card less the KV cache, activations and overhead), keeping room for the largest
    offloaded module, streamed in for its forward; the rest, an untied lm_head (last in the map) included, goes to CPU
    RAM (up to model.max_memory.cpu; none with model.offload=disk), then to disk. bitsandbytes leaves offloaded layers
    unquantized (transformers' llm_int8_enable_fp32_cpu_offload), in the compute dtype. Returns (rows on the card, rows
    off it, {"gpu", "cpu", "disk": decoder layers on each, "allowed": whether model.offload allows it})."""
    n, bits = arch.layers, weight_bits(s.method, s.double_quant, p)
    experts = arch.fused_params / n * p
    on_gpu = arch.quantized_params / n * bits / 8 + experts
    offloaded = arch.quantized_params / n * p + experts  # bitsandbytes leaves layers placed off the GPU unquantized
    other = (arch.other_params - arch.fused_params) * p  # embeddings, norms, and an untied lm_head
    head = arch.vocab * arch.hidden * p if other >= 2 * arch.vocab * arch.hidden * p else 0.0  # the last in the map
    others = sum(b for label, b in rows if not label.startswith(("base weights", "embeddings")))
    room = s.max_memory_gpu if s.max_memory_gpu is not None else (
        (gpu.memory_gib - CONTEXT_GIB - WORKSPACE_GIB) * GIB / (1 + FRAGMENTATION[s.method]) - others)
    if other + n * on_gpu <= room:
        return rows, [], {"gpu": n, "cpu": 0, "disk": 0, "allowed": True}
    resident, streamed = other - head, max(offloaded, head)  # accelerate keeps room for the largest offloaded module
    kept = max(0, min(n, math.floor((room - resident - streamed) / on_gpu)))
    cpu_room = s.max_memory_cpu if s.max_memory_cpu is not None else (0 if s.offload == "disk" else math.inf)
    in_ram = n - kept if cpu_room == math.inf else min(n - kept, math.floor((cpu_room - head) / offloaded))
    on_disk = n - kept - in_ram
    unquantized = f" ({8 * p}-bit: bitsandbytes does not quantize offloaded layers)" if s.method != "none" else ""
    card = [(f"decoder layers on the GPU: {kept} of {n} in {describe_quant(s, p)}", kept * on_gpu),
            ("embeddings and norms", resident),
            (f"one offloaded layer, streamed in for its forward{unquantized}", streamed),
            *[(label, b) for label, b in rows if not label.startswith(("base weights", "embeddings"))]]
    host = [(f"CPU RAM: {in_ram} decoder layers{unquantized}" + (" and lm_head" if head else ""), in_ram * offloaded + head),
            (f"disk: {on_disk} decoder layers", on_disk * offloaded)]
    placed = {"gpu": kept, "cpu": in_ram, "disk": on_disk, "allowed": s.offload != "cpu" or on_disk == 0}
    return card, [h for h in host if h[1] > 0], placed


def decode_speed(arch: Arch, s: Setting, p: int, gpu: GPU, card: list, host: list, pcie_gbs: float,
                 disk_gbs: float) -> dict:
    """Generation is bound by memory bandwidth: every token reads each weight once (and the KV cache) from the GPU's
    memory, each offloaded layer over PCIe, each layer on disk from the disk. Tokens/s of the whole batch."""
    weights = sum(b for label, b in card if label.startswith(("base weights", "embeddings", "decoder layers", "one offloaded")))
    kv = sum(b for label, b in card if label.startswith("KV cache"))
    ram = sum(b for label, b in host if label.startswith("CPU RAM"))
    disk = sum(b for label, b in host if label.startswith("disk"))
    seconds = (weights + kv) / (gpu.bandwidth_gbs * 1e9) + ram / (pcie_gbs * 1e9) + disk / (disk_gbs * 1e9)
    return {"decode_tokens_per_second": s.micro_batch / seconds, "seconds_per_token": seconds,
            "streamed_gb_per_token": (ram + disk) / 1e9}


def describe_quant(s: Setting, weight_bytes: int = 2) -> str:
    return {"nf4": "NF4" + (" + double quant" if s.double_quant else ""), "int8": "LLM.int8"}.get(
        s.method, f"{8 * weight_bytes}-bit")


def peak(rows) -> tuple[float, float]:
    """(reserved by PyTorch, on the card) in GiB."""
    total = sum(b for _, b in rows) / GIB
    return total - CONTEXT_GIB, total


# ---- speed and cost -----------------------------------------------------------------------------

def matmul_params(arch: Arch) -> float:
    """The weights a token's matmuls run through: the layers', the lm_head and the experts it is routed to."""
    return arch.quantized_params + arch.vocab * arch.hidden + arch.active_expert_params


def flops_per_token(arch: Arch, s: Setting) -> float:
    """Training FLOPs per token: forward 2N; backward 2N for the input gradients plus 2N for weight
    gradients when the weights train (LoRA's are negligible); one more forward with checkpointing, and one for the
    reference of preference pairs (the adapter off, or before training for a full fine-tune); and causal
    attention, 2 x layers x seq x hidden per forward."""
    forwards = 1 + (1 if s.checkpointing else 0) + (1 if s.reference else 0)
    passes = 2 * forwards + 2 + (0 if s.lora else 2)
    attention = 2 * arch.layers * s.max_length * arch.hidden * (2 + forwards)
    return passes * matmul_params(arch) + attention


def forward_speed(arch: Arch, gpu: GPU, method: str, max_length: int) -> float:
    """Tokens/s of a forward pass without gradients (distillation's teacher, prune's scoring): 2N FLOPs a token plus
    causal attention, at the share of the peak training reaches with that quantization."""
    flops = 2 * matmul_params(arch) + 2 * arch.layers * max_length * arch.hidden
    return gpu.tflops * 1e12 * EFFICIENCY[method] * gpu.reach / flops


@functools.lru_cache(maxsize=8)
def jsonl_rows(path: str, size: int, mtime_ns: int) -> int:
    """The rows of a .jsonl file, counted once per version of it (a plan asks for them several times)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def dataset_rows(cfg: FinetuneConfig) -> tuple[Optional[int], str]:
    """Training rows of the recipe (the eval split taken out) and how they were counted (None where unknown)."""
    d = cfg.data
    rows, how = d.max_samples, f"data.max_samples={d.max_samples}"
    if rows is None and d.path and Path(d.path).expanduser().is_file() and d.path.endswith(".jsonl"):
        path = Path(d.path).expanduser()
        rows = jsonl_rows(str(path), path.stat().st_size, path.stat().st_mtime_ns)
        how = f"{rows} rows in {path.name}"
    if rows is None:
        return None, "the row count of the data is unknown without loading it: set train.max_steps or data.max_samples"
    if not (d.eval_path or d.eval_split):
        rows = int(rows * (1 - d.eval_fraction))
    return rows, how


def dataset_steps(cfg: FinetuneConfig) -> tuple[Optional[int], str]:
    """Optimizer steps of the recipe, and how they were counted (None where the row count is unknown)."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps, f"train.max_steps={t.max_steps}"
    rows, how = dataset_rows(cfg)
    if rows is None:
        return None, how
    steps = math.ceil(rows / (t.micro_batch_size * t.grad_accum * cfg.plan.gpus)) * t.epochs
    return math.ceil(steps), f"{how}, {t.epochs:g} epochs"


def teacher_pass(cfg: FinetuneConfig, gpu: GPU, tokens: Optional[float] = None) -> dict:
    """distill.teacher's pass over the training rows, one row at a time, before the student is loaded: its peak on
    the card, its hours over `tokens` (default: every training row at data.max_length, so at most) and the store it
    writes (per trained token, k word ids in uint32 and k log-probs in float16, and Arrow's offsets: at most, as if
    every token were trained)."""
    from finetune.distill import teacher_model

    model_cfg, quant = teacher_model(cfg.distill.teacher)
    try:
        arch = load_arch(model_cfg)
    except UserError as e:
        raise UserError(f"distill.teacher={cfg.distill.teacher}: {e}") from None
    teacher_cfg = dataclasses.replace(cfg, model=model_cfg, quant=quant)
    s = dataclasses.replace(setting_of(teacher_cfg, arch), micro_batch=1, gpus=1, offload="none")
    p = dtype_bytes_of(cfg)
    rows = [r for r in memory(arch, teacher_cfg, s, p, "inference") if not r[0].startswith("logits of the last")]
    rows.append((f"logits of every position: {s.max_length} x {arch.vocab}, and their fp32 log-softmax",
                 s.max_length * arch.vocab * (p + 8)))
    reserved, total = peak(with_overhead(rows, s.method))
    how = "the tokens given"
    if tokens is None:
        n, how = dataset_rows(cfg)
        tokens, how = (n * s.max_length, f"{how} x {s.max_length} tokens (at most)") if n else (None, how)
    tps = forward_speed(arch, gpu, s.method, s.max_length)
    return {"model": arch.name, "params": arch.params, "quant": s.method, "memory_gib": {k: b / GIB for k, b in rows},
            "peak_gib": total, "fits": total <= gpu.memory_gib, "tokens": tokens, "tokens_from": how,
            "tokens_per_second": tps, "hours": tokens / tps / 3600 if tokens else None, "top_k": cfg.distill.top_k,
            "store_gb": tokens * (6 * cfg.distill.top_k + 8) / 1e9 if tokens else None}


# ---- the plan -----------------------------------------------------------------------------------

def dtype_bytes_of(cfg: FinetuneConfig) -> int:
    """Bytes of the compute dtype on a GPU: fp32 when asked, else bf16 or fp16 (auto picks one of them)."""
    return 4 if cfg.train.precision == "fp32" else 2


def evaluate_setting(arch: Arch, cfg: FinetuneConfig, gpu: GPU, s: Setting, mode: str) -> dict:
    """The peak on the card and what is held off it: {"rows", "host" (CPU RAM, disk), "reserved_gib", "total_gib",
    "fits", "margin_gib", "paged_bytes"}; a paged optimizer moves as much of its states off the card as it is over."""
    p = dtype_bytes_of(cfg)
    rows, host, placed = memory(arch, cfg, s, p, mode), [], None
    if mode == "inference" and s.offload != "none":
        rows, host, placed = place_layers(arch, s, p, gpu, rows)
    if mode == "train" and s.activation_offloading:
        host.append(("CPU RAM: offloaded activations (pinned)", offloaded_activations(arch, cfg, s, p)))
    rows = with_overhead(rows, s.method)
    reserved, total = peak(rows)
    paged = 0.0
    if mode == "train" and s.optim.startswith("paged") and total > gpu.memory_gib:
        states = next(b for label, b in rows if label.startswith("optimizer states"))
        paged = min(states, (total - gpu.memory_gib) * GIB)
        host.append(("CPU RAM: optimizer states paged out (moved back and forth every step)", paged))
        reserved, total = reserved - paged / GIB, total - paged / GIB
    return {"rows": rows, "host": host, "reserved_gib": reserved, "total_gib": total, "placement": placed,
            "fits": (placed is None or placed["allowed"]) and total <= gpu.memory_gib, "margin_gib": gpu.memory_gib - total,
            "paged_bytes": paged}


def knobs(s: Setting, mode: str) -> list[tuple[str, list]]:
    """Each change plan may suggest, cheapest first: (name, [(new setting, overrides, label), ...]) with its
    values from the mildest to the strongest."""
    eff = s.micro_batch * s.grad_accum
    out = []
    if mode == "train":
        out.append(("micro-batch", [(dataclasses.replace(s, micro_batch=m, grad_accum=eff // m),
                                     [f"train.micro_batch_size={m}", f"train.grad_accum={eff // m}"],
                                     f"micro-batch {m} x {eff // m} accumulation (same effective batch {eff})")
                                    for m in range(s.micro_batch - 1, 0, -1) if eff % m == 0]))
        if not s.checkpointing:
            out.append(("checkpointing", [(dataclasses.replace(s, checkpointing=True), ["train.gradient_checkpointing=true"],
                                           "gradient checkpointing on (about a third more compute)")]))
    if mode == "train" and not s.lora and s.master_weights == "fp32":
        out.append(("16bit", [(dataclasses.replace(s, master_weights="16bit", optim="adamw_kahan"),
                               ["train.master_weights=16bit", "train.optim=adamw_kahan"],
                               "bf16 weights, gradients and states, AdamW with Kahan summation (10 bytes a weight, "
                               "not 16)")]))
    if s.method != "nf4" and (s.lora or mode == "inference"):
        out.append(("nf4", [(dataclasses.replace(s, method="nf4", double_quant=True), ["quant=nf4"],
                             f"{describe_quant(s)} -> NF4 base weights")]))
    if s.lora and mode == "train":
        out.append(("rank", [(dataclasses.replace(s, r=r), [f"lora.r={r}"], f"LoRA rank {r}")
                             for r in (s.r // 2 ** k for k in range(1, 5)) if r >= 4]))
    out.append(("length", [(dataclasses.replace(s, max_length=n), [f"data.max_length={n}"], f"sequences of {n} tokens")
                           for n in (s.max_length // 2 ** k for k in range(1, 6)) if n >= 128]))
    if mode == "train" and not s.optim.startswith("paged"):
        out.append(("paging", [(dataclasses.replace(s, optim="paged_adamw_8bit"), ["train.optim=paged_adamw_8bit"],
                                "8-bit optimizer states, paged out to CPU RAM when the GPU runs short "
                                "(paged_adamw_8bit; slower steps while they move)")]))
    if mode == "train" and not s.activation_offloading:
        out.append(("activation offloading", [(dataclasses.replace(s, activation_offloading=True),
                                               ["train.activation_offloading=true"],
                                               "activations offloaded to CPU RAM (overlapped with compute)")]))
    if mode == "inference" and s.offload == "none":
        out.append(("offload", [(dataclasses.replace(s, offload="cpu"), ["model.offload=cpu"],
                                 "the layers that do not fit stream in from CPU RAM (model.offload=cpu; see the "
                                 "decode speed it costs)")]))
    return out


def suggestions(arch: Arch, cfg: FinetuneConfig, gpu: GPU, s: Setting, mode: str) -> list[dict]:
    """Changes that make it fit, each with its new peak: every single change, cheapest first, at its mildest
    value that fits; then the cheapest changes combined, in the same order, each at its mildest value that
    fits or else its strongest, until the whole fits."""
    def fit(setting):
        return evaluate_setting(arch, cfg, gpu, setting, mode)

    out = []
    for _, values in knobs(s, mode):
        for new, overrides, label in values:
            result = fit(new)
            if result["fits"]:
                out.append({"change": label, "overrides": overrides, "peak_gib": result["total_gib"]})
                break
    def fields(new: Setting, old: Setting) -> dict:
        return {k: v for k, v in new.__dict__.items() if v != getattr(old, k)}

    def apply(changes) -> Setting:
        merged = {}
        for _, _, f in changes:
            merged.update(f)
        return dataclasses.replace(s, **merged)

    changes = []  # (label, overrides, changed fields)
    for name, _ in knobs(s, mode):
        values = dict(knobs(apply(changes), mode)).get(name) or []
        if not values:
            continue
        chosen = next((v for v in values if fit(v[0])["fits"]), values[-1])
        before, after = fit(apply(changes))["total_gib"], fit(chosen[0])["total_gib"]
        if not fit(chosen[0])["fits"] and before - after < 0.1 * (before - gpu.memory_gib):
            continue  # it helps too little to be worth its cost
        changes.append((chosen[2], chosen[1], fields(chosen[0], apply(changes))))
        if fit(apply(changes))["fits"]:
            break
    for change in list(changes[:-1])[::-1]:  # drop what the later, stronger changes made unnecessary
        rest = [c for c in changes if c is not change]
        if fit(apply(rest))["fits"]:
            changes = rest
    result = fit(apply(changes))
    if changes and (len(changes) > 1 or not out):
        out.append({"change": " + ".join(c[0] for c in changes) + ("" if result["fits"] else " (still does not fit: "
                                                                    "a bigger GPU or a smaller model)"),
                    "overrides": [o for c in changes for o in c[1]], "peak_gib": result["total_gib"]})
    elif not out:
        out.append({"change": "no setting plan can change helps enough (a bigger GPU, more GPUs or a smaller model)",
                    "overrides": [], "peak_gib": result["total_gib"]})
    return out


def scale_out(arch: Arch, cfg: FinetuneConfig, gpu: GPU, s: Setting, mode: str) -> list[dict]:
    """When one GPU is not enough: the fewest GPUs of this kind that fit it with FSDP, the recipe unchanged."""
    if mode != "train" or s.gpus > 1:
        return []
    for n in (2, 4, 8):
        result = evaluate_setting(arch, cfg, gpu, dataclasses.replace(s, gpus=n, sharding="fsdp"), mode)
        if result["fits"]:
            config = "fsdp_qlora" if s.method == "nf4" else "fsdp"
            return [{"change": f"the recipe as it is, sharded over {n} GPUs with FSDP (accelerate launch --config_file "
                               f"configs/accelerate/{config}.yaml --num_processes {n}); peak per GPU",
                     "overrides": [f"plan.gpus={n}", "plan.sharding=fsdp"], "peak_gib": result["total_gib"]}]
    return []


SETTINGS_A_MODEL_NEEDS = ("data.max_length", "train.micro_batch_size")  # what the demo recipe sets for a tiny model


def check_settings_given(argv: list[str], cfg: FinetuneConfig) -> None:
    """`plan model=NAME` without a recipe would plan the embedded demo's sequence length and micro-batch, made for a
    0.9M-parameter model (and say a 70B fits with room to spare): ask for the settings the user will train with."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    if "recipe" in keys or "model" not in keys:
        return
    missing = [k for k in SETTINGS_A_MODEL_NEEDS if k not in keys]
    if missing:
        demo = ", ".join(f"{k}={operator.attrgetter(k)(cfg)}" for k in missing)
        raise UserError(
            f"`plan` with a model but no recipe would plan the embedded demo's {demo}"
            f" (made for its 0.9M-parameter model). Give the settings you will train with, e.g. data.max_length=2048 "
            "train.micro_batch_size=1, or a recipe (recipe=NAME; `python -m finetune --help` lists them).")


def make_plan(cfg: FinetuneConfig, gpu_name: Optional[str] = None, mode: Optional[str] = None) -> dict:
    """Everything `plan` prints, as a dict (what plan.format=json writes)."""
    gpu = pick_gpu(gpu_name or cfg.plan.gpu)
    mode = mode or cfg.plan.mode
    if cfg.train.precision == "bf16" and not gpu.bf16:
        raise UserError(f"train.precision=bf16 but the {gpu.name} has no bf16: set train.precision=auto or fp16.")
    arch = load_arch(cfg.model, cfg.lora)
    s = setting_of(cfg, arch)
    if mode == "inference":  # generate and export run in one process
        s = dataclasses.replace(s, gpus=1)
    result = evaluate_setting(arch, cfg, gpu, s, mode)
    out = {
        "recipe": cfg.recipe, "model": arch.name, "gpu": gpu.name, "gpu_memory_gib": gpu.memory_gib, "mode": mode,
        "gpus": s.gpus, "sharding": s.sharding if s.gpus > 1 else None,
        "params": arch.params, "setting": s.__dict__, "packing": cfg.data.packing, "max_position": arch.max_position,
        "memory_gib": {label: b / GIB for label, b in result["rows"]},
        "peak_allocated_gib": sum(b for _, b in result["rows"][:-2]) / GIB,
        "peak_reserved_gib": result["reserved_gib"], "peak_gib": result["total_gib"],
        "fits": result["fits"], "margin_gib": result["margin_gib"],
        "off_gpu_gib": {label: b / GIB for label, b in result["host"]}, "placement": result["placement"],
        "pcie_gbs": cfg.plan.pcie_gbs, "disk_gbs": cfg.plan.disk_gbs,
        "suggestions": [] if result["fits"] else suggestions(arch, cfg, gpu, s, mode) + scale_out(arch, cfg, gpu, s, mode),
    }
    if cfg.plan.solve != "none":
        out["solve"] = solve(arch, cfg, gpu, s, mode, cfg.plan.solve)
    if mode == "inference":
        out.update(decode_speed(arch, s, dtype_bytes_of(cfg), gpu, result["rows"], result["host"], cfg.plan.pcie_gbs,
                                cfg.plan.disk_gbs))
    if mode == "train":
        efficiency = cfg.plan.efficiency or EFFICIENCY[s.method] * gpu.reach
        fpt = flops_per_token(arch, s)
        tps = train_speed(arch, cfg, gpu, s, efficiency, result["paged_bytes"]) * s.gpus  # communication between
        # GPUs not modelled: an upper bound
        steps, how = dataset_steps(cfg)
        tokens = steps * s.sequences * s.grad_accum * s.gpus * s.max_length if steps else None
        hours = tokens / tps / 3600 if tokens else None
        out.update({"flops_per_token": fpt, "efficiency": efficiency, "tokens_per_second": tps,
                    "steps": steps, "steps_from": how, "train_tokens": tokens,
                    "hours": hours, "gpu_hours": hours * s.gpus if hours else None})
        if cfg.distill.teacher:
            out["teacher"] = teacher_pass(cfg, gpu)
    return out


SOLVE_LIMIT = 1 << 22  # 4M tokens or rows: the search stops there


def solve(arch: Arch, cfg: FinetuneConfig, gpu: GPU, s: Setting, mode: str, what: str) -> dict:
    """plan.solve: the longest sequence (max_seq) or the largest micro-batch (max_batch) that fits the GPU, everything
    else as set: doubling, then bisection (the peak grows with both). {what: N (0: not even 1 fits), "peak_gib"}."""
    key = "max_length" if what == "max_seq" else "micro_batch"

    def result(n: int) -> dict:
        return evaluate_setting(arch, cfg, gpu, dataclasses.replace(s, **{key: n}), mode)

    if not result(1)["fits"]:
        return {what: 0, "peak_gib": result(1)["total_gib"]}
    low, high = 1, 2
    while high <= SOLVE_LIMIT and result(high)["fits"]:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if result(middle)["fits"] else (low, middle)
    return {what: low, "peak_gib": result(low)["total_gib"], "capped": low >= SOLVE_LIMIT}


def train_speed(arch: Arch, cfg: FinetuneConfig, gpu: GPU, s: Setting, efficiency: float, paged: float) -> float:
    """Training tokens/s of one GPU: its FLOPs at `efficiency` of the dense 16-bit peak; offloaded activations cross
    PCIe twice (out in the forward, back in the backward: overlapped, so the slower of the two sets the pace); paged
    optimizer states cross it twice per step, not overlapped."""
    tps = gpu.tflops * 1e12 * efficiency / flops_per_token(arch, s)
    pcie = cfg.plan.pcie_gbs * 1e9
    if s.activation_offloading:
        per_token = offloaded_activations(arch, cfg, s, dtype_bytes_of(cfg)) / (s.sequences * s.max_length)
        tps = min(tps, pcie / (2 * per_token))
    step_tokens = s.sequences * s.grad_accum * s.max_length
    return step_tokens / (step_tokens / tps + 2 * paged / pcie)


def cpu_flops() -> float:
    """This CPU's fp32 matmul FLOP/s with torch's threads, measured (a tenth of a second): an upper bound on what
    training reaches here."""
    import time

    import torch

    a = torch.randn(1024, 1024)
    a @ a  # warm up the threads
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1:
        a @ a
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - start)


FASTEST_CPU_FLOPS = 2e13  # above any CPU's fp32 matmul peak: what surely trains within the hour is not measured


def cpu_estimate(cfg: FinetuneConfig, hours_of_interest: float = 0.0) -> Optional[dict]:
    """The fewest hours this recipe's training takes on this CPU: its FLOPs at the CPU's measured matmul peak (for
    a recipe whose row count is unknown, 100 steps); the CPU is measured only when even the fastest CPU would take
    over `hours_of_interest`. None where the model's config.json cannot be read."""
    try:
        arch = load_arch(cfg.model, cfg.lora)
    except Exception:  # no config.json here, or an architecture the meta device cannot build: loading says why
        return None
    s = setting_of(cfg, arch)
    steps, how = dataset_steps(cfg)
    flops = s.sequences * s.grad_accum * s.max_length * flops_per_token(arch, s) * (steps or 100)
    at_best = flops / FASTEST_CPU_FLOPS / 3600
    return {"params": arch.params, "steps": steps or 100, "steps_from": how if steps else "100 steps (rows unknown)",
            "hours": at_best if at_best <= hours_of_interest else flops / cpu_flops() / 3600}


def render(plan: dict) -> str:
    s = plan["setting"]
    gpus = plan.get("gpus", 1)
    on = (f"{gpus} x {plan['gpu']} ({plan['gpu_memory_gib']:.1f} GiB each), {plan['sharding'].upper()}; memory per GPU"
          if gpus > 1 else f"{plan['gpu']} ({plan['gpu_memory_gib']:.1f} GiB)")
    lines = [f"plan: {plan['recipe']} ({plan['model']}, {plan['params'] / 1e9:.2f}B parameters) on {on}, {plan['mode']}", ""]
    width = max(len(k) for k in plan["memory_gib"]) + 2
    lines += [f"  {k:<{width}}{v:8.2f} GiB" for k, v in plan["memory_gib"].items()]
    lines.append(f"  {'peak':<{width}}{plan['peak_gib']:8.2f} GiB  ({plan['peak_reserved_gib']:.2f} GiB reserved by PyTorch)")
    for k, v in plan.get("off_gpu_gib", {}).items():
        lines.append(f"  off the GPU, {k}: {v:.2f} GiB")
    if plan["mode"] == "train" and not plan.get("packing"):
        rows = (f"{s['micro_batch']} preference pair{'s' * (s['micro_batch'] > 1)}, {2 * s['micro_batch']} sequences"
                if s.get("pairs") else
                f"{s['micro_batch']} rows")
        lines.append(f"  (every micro-batch counted as {rows} of {s['max_length']} tokens: the worst case "
                     "without packing; with data.packing=true every sequence is that full)")
    lines.append("")
    if plan["fits"]:
        lines.append(f"fits: {plan['margin_gib']:.2f} GiB to spare ({plan['margin_gib'] / plan['gpu_memory_gib']:.0%} of the card)")
    elif plan.get("placement") and not plan["placement"]["allowed"]:
        lines.append(f"does NOT fit: {plan['placement']['disk']} decoder layers fit neither the GPU nor CPU RAM, and "
                     "model.offload=cpu keeps them off disk: raise model.max_memory.cpu, or model.offload=auto. "
                     "Other changes that fit, each with its new peak:")
        lines += [f"  - {t['change']}: {t['peak_gib']:.2f} GiB   [{' '.join(t['overrides'])}]" for t in plan["suggestions"]]
    else:
        lines.append(f"does NOT fit: {-plan['margin_gib']:.2f} GiB over. Cheapest changes that fit, each with its new peak:")
        lines += [f"  - {t['change']}: {t['peak_gib']:.2f} GiB   [{' '.join(t['overrides'])}]" for t in plan["suggestions"]]
    if plan.get("solve"):
        (what, n), peak_gib = next(iter(plan["solve"].items())), plan["solve"]["peak_gib"]
        lines.append("")
        if what == "max_seq":
            beyond = f" (beyond the model's {plan['max_position']} positions)" if plan.get("max_position") and n > plan["max_position"] else ""
            lines.append(f"solve: the longest sequence that fits is {n:,} tokens{beyond}, at a peak of {peak_gib:.2f} GiB "
                         f"(micro-batch {s['micro_batch']}; data.max_length={n})" if n else
                         "solve: not even a 1-token sequence fits: see the changes above")
        else:
            lines.append(f"solve: the largest micro-batch that fits is {n} rows of {s['max_length']} tokens, at a peak of "
                         f"{peak_gib:.2f} GiB (train.micro_batch_size={n})" if n else
                         "solve: not even a micro-batch of 1 fits: see the changes above")
    moving = f"PCIe at {plan['pcie_gbs']:g} GB/s, disk at {plan['disk_gbs']:g} GB/s (plan.pcie_gbs, plan.disk_gbs)"
    if plan["mode"] == "inference":
        lines.append("")
        lines.append(f"decode: ~{plan['decode_tokens_per_second']:,.3g} tokens/s for the batch of {s['micro_batch']} "
                     f"(each token reads every weight once: the GPU's memory bandwidth"
                     + (f"; {plan['streamed_gb_per_token']:.2f} GB of offloaded layers per token over {moving})"
                        if plan["streamed_gb_per_token"] else ")"))
    if plan["mode"] == "train":
        lines.append("")
        offloading = plan["off_gpu_gib"]
        lines.append(f"speed: ~{plan['tokens_per_second']:,.0f} tokens/s ({plan['flops_per_token'] / 1e9:.1f} GFLOP per "
                     f"token at {plan['efficiency']:.0%} of the GPU's dense 16-bit peak"
                     + (f"; what is offloaded or paged moves over {moving}" if offloading else "")
                     + (f", {gpus} GPUs; their communication is not modelled: an upper bound)" if gpus > 1 else ")"))
        if plan["steps"]:
            per = 2 if s.get("pairs") else 1
            lines.append(f"cost: {plan['steps']} steps ({plan['steps_from']}) x {s['micro_batch'] * s['grad_accum'] * gpus * per} "
                         f"sequences x {s['max_length']} tokens = {plan['train_tokens'] / 1e6:,.1f}M tokens (at most) -> "
                         f"{plan['hours']:.2f} h = {plan['gpu_hours']:.2f} GPU-hours"
                         + (" (each pair's chosen and rejected answers" + (", and a reference forward of both)"
                            if s.get("reference") else ")") if per == 2 else ""))
        else:
            lines.append(f"cost: {plan['steps_from']}")
    if plan.get("teacher"):
        lines += ["", *render_teacher(plan["teacher"], plan["gpu_memory_gib"])]
    return "\n".join(lines)


def render_teacher(t: dict, gpu_gib: float) -> list[str]:
    """The lines of distill.teacher's pass."""
    fits = (f"fits: {gpu_gib - t['peak_gib']:.2f} GiB to spare" if t["fits"] else
            f"does NOT fit: {t['peak_gib'] - gpu_gib:.2f} GiB over (a smaller teacher, or a larger GPU)")
    lines = [f"teacher pass (distill.teacher): {t['model']}, {t['params'] / 1e9:.2f}B parameters, "
             f"{t['quant'] if t['quant'] != 'none' else '16-bit'}, one row at a time, let go before the student loads: "
             f"peak {t['peak_gib']:.2f} GiB; {fits}"]
    if t["tokens"]:
        lines.append(f"  {t['tokens'] / 1e6:,.1f}M tokens ({t['tokens_from']}) at ~{t['tokens_per_second']:,.0f} "
                     f"tokens/s -> {t['hours']:.3g} GPU-hours; store of its top-{t['top_k']}: at most "
                     f"{t['store_gb']:.3g} GB on disk (read back by later runs on the same rows)")
    else:
        lines.append(f"  time and store: {t['tokens_from']}")
    return lines


def auto_fit(cfg: FinetuneConfig, processes: int = 1, strategy: str = "single") -> dict:
    """train.auto_fit: the largest micro-batch that fits the local GPU (within AUTO_FIT_USE of its memory),
    with checkpointing off where that fits too; the effective batch stays the same. Changes cfg.train in
    place; returns what it chose."""
    import torch

    t = cfg.train
    if not torch.cuda.is_available():
        return {"applied": False, "reason": "no CUDA GPU: the plan models GPU memory"}
    gpu, arch = local_gpu(), load_arch(cfg.model, cfg.lora)
    eff = t.micro_batch_size * t.grad_accum
    base = dataclasses.replace(setting_of(cfg, arch), gpus=processes, sharding="fsdp" if strategy == "fsdp" else "ddp")
    for checkpointing in (False, True):
        for mb in sorted((m for m in range(1, eff + 1) if eff % m == 0), reverse=True):
            s = dataclasses.replace(base, micro_batch=mb, grad_accum=eff // mb, checkpointing=checkpointing)
            result = evaluate_setting(arch, cfg, gpu, s, "train")
            if result["total_gib"] <= AUTO_FIT_USE * gpu.memory_gib:
                t.micro_batch_size, t.grad_accum, t.gradient_checkpointing = mb, eff // mb, checkpointing
                return {"applied": True, "micro_batch_size": mb, "grad_accum": eff // mb,
                        "gradient_checkpointing": checkpointing, "predicted_peak_gib": result["total_gib"],
                        "gpu": gpu.name}
    return {"applied": False, "reason": f"nothing fits the {gpu.name} even at micro-batch 1 with checkpointing: "
                                        "see python -m finetune plan"}
