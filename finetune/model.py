"""The base model: device and precision, quantization config, loading (and an adapter on top), EOS ids.

transformers' BitsAndBytesConfig defaults are fp4 and an fp32 compute dtype; QLoRA wants NF4, double
quantization and 16-bit compute, so every field is set here explicitly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from finetune.config import ModelConfig, QuantConfig, TrainConfig
from finetune.errors import UserError, closest
from finetune.tokenizer import check_model_path, hub_load_error, is_local_path, warn_remote_code

log = logging.getLogger("finetune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Device:
    type: str                 # "cuda" or "cpu"
    name: str                 # "NVIDIA H100 80GB HBM3" or "cpu"
    bf16: bool                # bf16 matmuls supported
    precision: str            # resolved train precision: bf16 | fp16 | fp32
    compute_dtype: torch.dtype  # dtype of 4-bit layer compute and of unquantized weights

    def describe(self) -> str:
        return self.name if self.type == "cpu" else f"cuda ({self.name})"


def detect_device(train: TrainConfig, quant: QuantConfig, model: ModelConfig) -> Device:
    """The device to train on and the precision it supports; a UserError for settings it cannot run."""
    if torch.cuda.is_available():
        kind, name, bf16 = "cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported()
    else:
        kind, name, bf16 = "cpu", "cpu", True  # PyTorch runs bf16 on every CPU (slowly without AMX/AVX512-BF16)
    problems = []
    precision = train.precision
    if precision == "auto":
        precision = "fp32" if kind == "cpu" else ("bf16" if bf16 else "fp16")
    if precision == "bf16" and not bf16:
        problems.append(f"train.precision=bf16 but the GPU ({name}) has no bf16 support (it needs compute "
                        "capability 8.0+, e.g. A100, RTX 30xx): set train.precision=fp16, or train.precision=auto.")
    if precision == "fp16" and kind == "cpu":
        problems.append("train.precision=fp16 needs a CUDA GPU and none was found: on CPU use train.precision=fp32 "
                        "(or auto).")
    if model.attn_implementation == "flash_attention_2" and kind == "cpu":
        problems.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU: use auto or sdpa on CPU.")
    if train.compile and kind == "cpu":
        problems.append("train.compile=true is for CUDA GPUs (on a CPU it compiles for minutes and gains little): "
                        "set it to false.")
    if train.activation_offloading and kind == "cpu":
        problems.append("train.activation_offloading=true moves activations from a GPU to CPU RAM, and this machine "
                        "has no CUDA GPU: set it to false.")
    if train.liger_kernel and kind == "cpu":
        problems.append("train.liger_kernel=true needs a CUDA GPU (Liger's kernels are Triton): set it to false.")
    if train.liger_kernel and kind == "cuda":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            problems.append("train.liger_kernel=true but liger-kernel is not installed: pip install 'finetune[gpu]'.")
    if train.master_weights == "16bit" and precision != "bf16":
        problems.append(f"train.master_weights=16bit trains bf16 weights, and this run trains in {precision} on {name}: "
                        "set train.precision=bf16, or remove train.master_weights (mixed precision).")
    if problems:
        raise UserError(*problems)
    compute = precision if quant.compute_dtype == "auto" else quant.compute_dtype
    return Device(kind, name, bf16, precision, DTYPES[compute])


def weights_dtype(train: TrainConfig, lora, device: Device) -> Optional[torch.dtype]:
    """The dtype a full fine-tune (lora.enabled=false) keeps its trained weights in: fp32 master weights under 16-bit
    autocast (train.master_weights=fp32, mixed precision), or the 16-bit compute dtype (16bit, with a warning where
    no Kahan summation keeps the small updates). None with LoRA: the frozen base in the compute dtype."""
    if lora.enabled:
        return None
    if train.master_weights == "fp32":
        return torch.float32
    if train.optim != "adamw_kahan":
        log.warning("train.master_weights=16bit with train.optim=%s: every update smaller than half a weight's bf16 "
                    "spacing (about 0.4%% of the weight) is rounded away, so at a usual fine-tuning learning rate many "
                    "weights never change. Use train.optim=adamw_kahan (Kahan summation keeps them), or "
                    "master_weights=fp32.", train.optim)
    return device.compute_dtype


def others_busy_cpus(window: float = 0.2) -> Optional[float]:
    """How many CPUs other processes keep busy, measured over `window` seconds (Linux: /proc/stat, less this
    process's own time); None where that cannot be read."""
    import time

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:8]]
        times = os.times()
        return sum(values) - values[3] - values[4], times.user + times.system  # busy ticks (all), this process (s)

    try:
        (busy0, own0), start = sample(), time.perf_counter()
        time.sleep(window)
        (busy1, own1), elapsed = sample(), time.perf_counter() - start
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((busy1 - busy0) / ticks - (own1 - own0)) / elapsed)


def fit_cpu_threads() -> None:
    """On a CPU another process keeps busy, torch's default of a thread per core makes training several times
    slower (its threads wait on each other): one thread per core left free, at least one. Measured by
    scripts/bench_threads.py (2 busy processes on 2 cores: 163 s with torch's 2 threads, 24 s with 1; idle, 13.5 s
    with 2). OMP_NUM_THREADS, when set, decides instead."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores, busy = os.cpu_count() or 1, others_busy_cpus()
    if busy is None or busy < 0.5:
        return
    threads = max(1, cores - round(busy))
    if threads < torch.get_num_threads():
        log.info("the CPU is busy (other processes use %.1f of its %d cores): training with %d thread(s); set "
                 "OMP_NUM_THREADS to choose", busy, cores, threads)
        torch.set_num_threads(threads)


DEFAULT_SKIP = ["lm_head", "embed_out"]  # output heads (Llama-likes, GPT-NeoX): never quantized by bitsandbytes


def quantization_config(quant: QuantConfig, compute_dtype: torch.dtype, sharded: bool = False, offload: bool = False):
    """`sharded`: FSDP will shard the model. FSDP shards only floating-point tensors of one dtype, so the packed
    4-bit weights are stored in the compute dtype (the same bytes: four 4-bit values per bf16 element). `offload`:
    model.offload places some layers off the GPU, which bitsandbytes leaves unquantized (in the compute dtype)."""
    from transformers import BitsAndBytesConfig

    # A skip list replaces transformers' default one (the output head): keep the head out of it too.
    skip = list(dict.fromkeys([*quant.skip_modules, *DEFAULT_SKIP])) if quant.skip_modules else None
    if quant.method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant.nested,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
            llm_int8_skip_modules=skip,  # (the name is historical: 4-bit reads it too)
            llm_int8_enable_fp32_cpu_offload=offload,
        )
    if quant.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=offload)
    return None


def device_map_for(device: Device, world=None) -> Optional[dict]:
    """Where from_pretrained puts the weights: the whole model on this process's GPU (one process, or DDP:
    one GPU per process), or no map under FSDP, whose processes each get a shard from accelerate."""
    if world is not None and world.sharded:
        return None
    if device.type != "cuda":
        return {"": "cpu"}
    return {"": world.local_rank if world is not None else 0}


def placement(cfg: ModelConfig, quant: QuantConfig, device: Device, world=None) -> dict:
    """from_pretrained's device_map (and, with model.offload, max_memory and offload_folder): accelerate fills the
    GPU, then CPU RAM, then disk, within model.max_memory, and streams offloaded layers in for each forward."""
    if cfg.offload == "none":
        return {"device_map": device_map_for(device, world)}
    if device.type == "cpu" and quant.method != "none":
        raise UserError(f"model.offload={cfg.offload} on a CPU: bitsandbytes' {quant.method} layers cannot stream in from "
                        "disk there. Load the base unquantized (quant=none), or run on a GPU.")
    from accelerate.utils import get_max_memory

    main = 0 if device.type == "cuda" else "cpu"
    memory = {k: v for k, v in get_max_memory().items() if k in (main, "cpu")}
    if cfg.max_memory.gpu and device.type == "cuda":
        memory[0] = cfg.max_memory.gpu
    if cfg.max_memory.cpu:
        memory["cpu"] = cfg.max_memory.cpu
    elif cfg.offload == "disk" and device.type == "cuda":
        memory["cpu"] = 0  # straight from the GPU to disk: RAM holds a layer only while it streams in
    # A folder even for offload=cpu: what does not fit is written there (else transformers writes it under the working
    # directory) before check_placement refuses it
    return {"device_map": "auto", "max_memory": memory,
            "offload_folder": cfg.offload_folder or temporary_folder("finetune-offload-")}


def temporary_folder(prefix: str) -> str:
    """A folder deleted when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def load_base_model(cfg: ModelConfig, quant: QuantConfig, device: Device, dtype: Optional[torch.dtype] = None,
                    world=None):
    """The base model on `device`, quantized as `quant` says (16/32-bit in `dtype` when quant.method=none; the
    names in quant.skip_modules are checked before, by check_skeleton).
    `world` (finetune.distributed.World): under DDP each process loads it whole on its own GPU; under FSDP it
    is loaded without a device map and accelerate places each process's shard."""
    from transformers import AutoModelForCausalLM

    check_model_path(cfg)
    warn_remote_code(cfg)
    fsdp = world is not None and world.sharded
    kwargs = dict(
        use_safetensors=None if cfg.allow_pickle else True,  # pickle weights can run code when loaded
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
        dtype=dtype or device.compute_dtype,  # the unquantized parts (embeddings, norms, head) too
        quantization_config=quantization_config(quant, device.compute_dtype, sharded=fsdp,
                                                offload=cfg.offload != "none") or dequantize_shipped(cfg),
        **placement(cfg, quant, device, world),
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except Exception as e:
        error = model_load_error(cfg, e)
        if error is None:
            raise
        raise error from None
    check_placement(cfg, device, getattr(model, "hf_device_map", None))
    if device.type == "cpu":
        keep_4bit_cpu_layers_differentiable(model)
    return model


def check_placement(cfg: ModelConfig, device: Device, device_map: Optional[dict]) -> None:
    """What model.offload placed can run as asked: model.offload=cpu put nothing on disk, and the device that
    computes holds some of the model (accelerate cannot run a model whose every layer streams in)."""
    if cfg.offload == "none" or not device_map:
        return
    placed, main = set(device_map.values()), 0 if device.type == "cuda" else "cpu"
    sizes = ", ".join(f"model.max_memory.{k}={v}" for k, v in cfg.max_memory.given().items()) or "what is free"
    if cfg.offload == "cpu" and "disk" in placed:
        where = "the GPU and CPU RAM" if device.type == "cuda" else "CPU RAM"
        raise UserError(f"model.offload=cpu: {cfg.name_or_path} does not fit {where} ({sizes}): "
                        "raise model.max_memory.cpu, or let the rest go to disk with model.offload=auto.")
    if main not in placed:
        raise UserError(f"model.offload={cfg.offload}: {sizes} leaves no layer of {cfg.name_or_path} on the "
                        f"{device.describe()}, which computes: raise model.max_memory.{'gpu' if main == 0 else 'cpu'}.")
    counts = {where: sum(1 for d in device_map.values() if d == where) for where in (main, "cpu", "disk")}
    log.info("model.offload=%s: %s", cfg.offload, ", ".join(f"{n} modules on {'the GPU' if where == 0 else where}"
                                                            for where, n in counts.items() if n))


def model_load_error(cfg: ModelConfig, e: Exception) -> Optional[UserError]:
    """What from_pretrained's exception means to the user (None: a bug, not theirs): code the model needs that
    model.trust_remote_code does not allow, pickle weights not allowed or unreadable, weights cut short."""
    key, first = f"model.name_or_path={cfg.name_or_path}", (str(e).strip().splitlines() or [""])[0][:200]
    local = is_local_path(cfg.name_or_path)
    if "trust_remote_code" in str(e):
        return UserError(f"{key} ships its own modelling code (auto_map in its config.json), which runs only with "
                         "model.trust_remote_code=true: set it if you trust that code, or use a model transformers "
                         "supports natively.")
    if not cfg.allow_pickle and "safetensors" in str(e).lower() and local and any(
            Path(cfg.name_or_path).expanduser().glob("*.bin")):
        return UserError(f"{key} has only pickle (.bin) weights, which can run code when loaded: convert them to "
                         "safetensors, or set model.allow_pickle=true if you trust their source.")
    if type(e).__name__ in ("SafetensorError", "UnpicklingError") or "weights_only" in str(e):
        return UserError(f"{key}: its weights cannot be read ({type(e).__name__}: {first}): a file is cut short or "
                         "damaged (an interrupted download or copy). Download or copy the model again.")
    if local and not isinstance(e, OSError):
        return None
    return hub_load_error("model.name_or_path", cfg.name_or_path, e) if isinstance(e, (OSError, ValueError)) else None


def check_skeleton(model_cfg: ModelConfig, quant: QuantConfig, lora) -> None:
    """What the model's skeleton (config.json, built on the meta device) can say before a weight is loaded or
    anything written: the names in lora.target_modules, lora.target_parameters, lora.modules_to_save and
    quant.skip_modules, model.attn_implementation, and weights bitsandbytes cannot quantize. Where config.json cannot
    be read, loading the model says why, later."""
    from finetune.plan import meta_model

    try:
        config, net = meta_model(model_cfg)
    except Exception:  # no config.json here, or an architecture the meta device cannot build: loading says why
        return
    check_attention(model_cfg, net)
    check_prequantized(model_cfg, config, quant)
    if lora.enabled:
        check_lora_targets(model_cfg, net, lora)
    if quant.skip_modules and quant.method != "none":
        check_skip_modules(net, quant.skip_modules)


ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def check_lora_targets(model_cfg: ModelConfig, net, lora) -> None:
    """Each lora.target_modules and lora.modules_to_save name is a module of the model, each target a layer LoRA can
    adapt; each lora.target_parameters name is one of its weights."""
    from finetune.plan import fused_weights

    head = net.get_output_embeddings()
    linears = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in net.named_modules()
                            if isinstance(m, torch.nn.Linear) and m is not head)
    fused = list(fused_weights(net))
    hint = f" Its fused expert weights take lora.target_parameters=[{', '.join(fused)}]." if fused else ""
    for key, wanted in (("lora.target_modules", [t for t in lora.target_modules if t != "all-linear"]),
                        ("lora.modules_to_save", list(lora.modules_to_save))):
        matched = {w: [m for n, m in net.named_modules() if n == w or n.endswith("." + w)] for w in wanted}
        missing = [w for w, found in matched.items() if not found]
        if missing:
            raise UserError(f"{key}: {', '.join(missing)} names no module of {model_cfg.name_or_path}. Its linear "
                            f"layers: {', '.join(linears)} (or all-linear).{closest(missing[0], linears)}{hint}")
        unfit = [w for w, found in matched.items() if not any(isinstance(m, ADAPTABLE) for m in found)]
        if key == "lora.target_modules" and unfit:
            kinds = ", ".join(sorted({type(m).__name__ for m in matched[unfit[0]]}))
            raise UserError(f"lora.target_modules: {unfit[0]} is {kinds} in {model_cfg.name_or_path}, not a linear "
                            f"layer LoRA can adapt. Its linear layers: {', '.join(linears)} (or all-linear).{hint}")
    check_target_parameters(model_cfg, net, lora, fused)


def check_target_parameters(model_cfg: ModelConfig, net, lora, fused: list[str]) -> None:
    """lora.target_parameters names weights of the model; what PEFT adapts as parameters by itself (a mixture of
    experts' fused weights and router, for all-linear on Qwen3-MoE or Mixtral) can take no dropout or DoRA."""
    from finetune.lora import adapted_parameters
    from finetune.plan import within_layer

    params = [n for n, _ in net.named_parameters()]
    missing = [w for w in lora.target_parameters if not any(n == w or n.endswith("." + w) for n in params)]
    if missing:
        raise UserError(f"lora.target_parameters: {', '.join(missing)} names no weight of {model_cfg.name_or_path}. "
                        + (f"Its fused expert weights: {', '.join(fused)}." if fused else
                           "It has no fused expert weights: adapt its linear layers with lora.target_modules."))
    adapted = dict.fromkeys(within_layer(name) for name, _, _ in adapted_parameters(lora, net))
    if adapted and not lora.target_parameters and (lora.dropout > 0 or lora.use_dora):
        raise UserError(f"lora.target_modules={list(lora.target_modules)} on {model_cfg.name_or_path}: PEFT adapts its "
                        f"fused experts and router as parameters ({', '.join(adapted)}), which takes no dropout or "
                        f"DoRA. Set lora.dropout=0 (and lora.use_dora=false), or adapt the attention only with "
                        f"lora.target_modules=[q_proj,k_proj,v_proj,o_proj].")


def shipped_quantization(config) -> Optional[str]:
    """The quant_method of the quantization_config a checkpoint's config.json carries (mxfp4, fp8, ...), or None."""
    shipped = getattr(config, "quantization_config", None)
    method = shipped.get("quant_method") if isinstance(shipped, dict) else getattr(shipped, "quant_method", None)
    return str(getattr(method, "value", method)) if method else None


def dequantize_shipped(cfg: ModelConfig):
    """For quant=none: gpt-oss's MXFP4 experts dequantized to 16-bit on load (trainable, and the same on every GPU);
    None for other checkpoints."""
    from finetune.plan import arch_config

    try:
        config = arch_config(cfg)  # config.json alone: no skeleton to build for it
    except UserError:  # unreadable: loading says why
        return None
    if shipped_quantization(config) == "mxfp4":
        from transformers import Mxfp4Config

        return Mxfp4Config(dequantize=True)
    return None


def check_prequantized(model_cfg: ModelConfig, config, quant: QuantConfig) -> None:
    """A checkpoint shipped quantized by another method (gpt-oss's MXFP4 experts, FP8) cannot be quantized again by
    bitsandbytes."""
    method = shipped_quantization(config)
    if quant.method != "none" and method and method != "bitsandbytes":
        raise UserError(f"quant={quant.method}: {model_cfg.name_or_path} ships weights already quantized with "
                        f"{method} (quantization_config in its config.json), which bitsandbytes cannot quantize again. "
                        f"Use quant=none: transformers dequantizes them to 16-bit on load, and LoRA trains on that.")


def check_attention(model_cfg: ModelConfig, net) -> None:
    """model.attn_implementation=sdpa on a model transformers has no SDPA attention for (gpt-oss: its attention
    sinks) would fail inside from_pretrained."""
    import transformers

    if model_cfg.attn_implementation == "sdpa" and not getattr(net, "_supports_sdpa", True):
        raise UserError(f"model.attn_implementation=sdpa: {type(net).__name__} has no SDPA attention in transformers "
                        f"{transformers.__version__}. Use model.attn_implementation=auto (eager here) or eager.")


def check_skip_modules(model, patterns: list[str]) -> None:
    """Each quant.skip_modules name must keep some Linear layer in 16-bit: a typo would quantize everything."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    unmatched = []
    for p in patterns:
        kept = [n for n in linears if not should_convert_module(n, [p])]
        if not kept:
            unmatched.append(p)
        elif all(not should_convert_module(n, DEFAULT_SKIP) for n in kept):
            log.warning("quant.skip_modules: %s (%s) is never quantized by bitsandbytes anyway: listing it changes "
                        "nothing.", p, ", ".join(kept))
    if unmatched:
        examples = ", ".join(dict.fromkeys(n.rsplit(".", 2)[0] for n in linears[:40]))
        raise UserError(f"quant.skip_modules: {', '.join(unmatched)} matches no linear layer of the model. Names are "
                        f"module paths or their prefixes, e.g. {examples}.")


def offloaded_placement(model) -> dict:
    """For a base model.offload placed partly in CPU RAM or on disk: the same placement for PEFT, which takes the
    offload hooks off to insert the adapter and dispatches the model again (by default with a map of its own)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if not {"cpu", "disk"} & set(device_map.values()):
        return {}
    return {"device_map": {f"base_model.model.{k}" if k else "": v for k, v in device_map.items()}}


def attach_adapter(model, adapter_dir: Path, trainable: bool = False):
    """The PEFT adapter saved in adapter_dir, on top of `model` (a base loaded by load_base_model); `trainable`: to
    train further (init_from)."""
    import warnings

    from peft import PeftModel

    placement = offloaded_placement(model)
    with warnings.catch_warnings():  # PEFT still asks transformers 5.2x for the renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        if not placement:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        return attach_to_offloaded(model, Path(adapter_dir).resolve(), placement)


def attach_to_offloaded(model, adapter_dir: Path, placement: dict):
    """PEFT rewrites the disk-offloaded safetensors files with the adapter's weights in, under a path relative to the
    working directory (peft 0.21 PeftModel._update_offload): let it write them in a temporary folder, and make the
    offload index point there."""
    from peft import PeftModel

    folder, cwd = temporary_folder("finetune-offload-peft-"), os.getcwd()
    os.chdir(folder)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), **placement)
    finally:
        os.chdir(cwd)
    for module in peft_model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        index = getattr(getattr(weights, "dataset", weights), "index", None) or {}
        for entry in index.values():
            if entry.get("safetensors_file") and not os.path.isabs(entry["safetensors_file"]):
                entry["safetensors_file"] = os.path.join(folder, entry["safetensors_file"])
    return peft_model


def release_memory() -> None:
    """After the last reference to a model is dropped: its memory back, on the GPU too (the allocator's cache)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def keep_4bit_cpu_layers_differentiable(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference repacking of 4-bit weights.

    In bitsandbytes 0.50 the first eval-mode, no-grad forward on such a CPU repacks each Linear4bit
    for a gemv kernel that has no autograd, and every later forward, training included, takes that
    path: the gradient through the frozen base layers is silently dropped. We evaluate the base
    before training, so it would always happen. With repacking off, eval and training share the
    dequantize-then-matmul path (and agree numerically). Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def eos_token_ids(tokenizer, base_generation_config=None) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS (the chat template's end-of-turn token after
    training), then those of the base's own generation config."""
    ids = [tokenizer.eos_token_id]
    base_eos = getattr(base_generation_config, "eos_token_id", None)
    for i in base_eos if isinstance(base_eos, list) else [base_eos]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def write_generation_config(path: Path, model_cfg: ModelConfig, tokenizer) -> list[int]:
    """generation_config.json with every EOS id of the training chat template and the base, and the pad id."""
    from transformers import GenerationConfig

    try:
        base = GenerationConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    except (OSError, ValueError):
        base = GenerationConfig()
    eos = eos_token_ids(tokenizer, base)
    base.eos_token_id = eos if len(eos) > 1 else eos[0]
    base.pad_token_id = tokenizer.pad_token_id
    base.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else base.bos_token_id
    base.save_pretrained(str(path))
    return eos
