"""The typed schema of a run: one dataclass per config group, registered in Hydra's ConfigStore.

Each module takes its own slice (`cfg.model`, `cfg.train`, ...). `validate` checks every field's
choices and range and the combinations across groups, and reports all problems at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from finetune.errors import UserError, closest


def opt(default: Any, help: str, choices: Optional[list] = None, min: Optional[float] = None,
        max: Optional[float] = None, min_exclusive: bool = False) -> Any:
    """A field with its help text and, where they apply, allowed values and range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


COMPUTE_DTYPES = ["auto", "bfloat16", "float16", "float32"]
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit
DATA_FORMATS = ["auto", "messages", "sharegpt", "instruction", "prompt_completion", "text", "preference",
                "preference_chat"]  # see finetune/data/formats.py
# adamw_kahan: torch-optimi's AdamW, which keeps Kahan-summation buffers for 16-bit weights (train.master_weights=16bit)
OPTIMIZERS = ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_kahan", "adafactor"]
# llama.cpp's file types that need no importance matrix (its i-quants and Q2_K_S do; TQ* are for ternary models only),
# by the names of llama-quantize and Ollama
GGUF_LEVELS = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
               "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]


@dataclass
class MaxMemory:
    """model.max_memory: with model.offload, the most each device may hold (null = what it has free)."""
    gpu: Optional[str] = opt(None, "the GPU's share for weights, e.g. 10GiB (the KV cache and activations come on top)")
    cpu: Optional[str] = opt(None, "CPU RAM for offloaded weights, e.g. 30GiB (model.offload=auto|cpu|disk)")

    def given(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ModelConfig:
    name_or_path: str = opt(MISSING, "Hugging Face Hub id or local folder of the base model")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model")
    tokenizer: Optional[str] = opt(None, "tokenizer id or folder; defaults to name_or_path")
    trust_remote_code: bool = opt(False, "run modelling code shipped with the checkpoint (only for repos you trust)")
    allow_pickle: bool = opt(False, "also load pickle (.bin) weights, which can run code when loaded; by default "
                             "only safetensors are loaded")
    attn_implementation: str = opt("auto", "attention kernel: auto = transformers' choice (sdpa where the model has it, "
                                   "else eager)", ["auto", "sdpa", "eager", "flash_attention_2"])
    hub_id: Optional[str] = opt(None, "the Hub id a local name_or_path is a copy of: recorded as the adapter's base "
                                "model, so that other machines and tools can find it")
    offload: str = opt("none", "`generate` and `eval` (and plan.mode=inference) of a model bigger than the GPU: the layers "
                       "that do not fit go to CPU RAM (cpu), to disk (disk), or to RAM and then disk (auto), and "
                       "stream in for every forward (accelerate's device map; bitsandbytes leaves offloaded layers "
                       "unquantized). Training refuses it: use train.activation_offloading and a paged optimizer",
                       ["none", "auto", "cpu", "disk"])
    max_memory: MaxMemory = field(default_factory=MaxMemory)
    offload_folder: Optional[str] = opt(None, "model.offload=disk|auto: where weights offloaded to disk are written; "
                                        "null = a temporary folder, deleted afterwards (layers a safetensors "
                                        "checkpoint stores as loaded stream from its own files)")


@dataclass
class QuantConfig:
    method: str = opt("nf4", "how the frozen base weights are stored", ["nf4", "int8", "none"])
    double_quant: Optional[bool] = opt(None, "4-bit only: quantize the quantization scales too (~0.4 bit/param "
                                       "saved); null = on for nf4, off otherwise")
    compute_dtype: str = opt("auto", "dtype 4-bit layers compute in; auto follows train.precision",
                             COMPUTE_DTYPES)
    skip_modules: List[str] = opt([], "modules kept unquantized (in the compute dtype) while the rest is quantized: "
                                  "names or prefixes, e.g. [model.layers.0, model.layers.31]; lm_head always is")

    @property
    def nested(self) -> bool:
        """Whether the 4-bit scales are quantized too: quant.double_quant, by default on for nf4 (the one place this
        default lives; the other methods cannot)."""
        return self.method == "nf4" if self.double_quant is None else self.double_quant

    def at(self, method: str, skip_modules: Optional[list] = None) -> "QuantConfig":
        """This base loaded at another precision (eval, generate): the 4-bit settings kept where they apply."""
        same = method == self.method
        return QuantConfig(method=method, double_quant=self.double_quant if same else None,
                           compute_dtype=self.compute_dtype if method == "nf4" else "auto",
                           skip_modules=list(self.skip_modules if skip_modules is None else skip_modules))


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "train LoRA adapters; false trains every weight (16/32-bit base only)")
    r: int = opt(16, "adapter rank", min=1)
    alpha: float = opt(32, "scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)", min=0,
                       min_exclusive=True)
    dropout: float = opt(0.05, "dropout on the adapter input", min=0, max=0.9)
    target_modules: List[str] = opt(["all-linear"], "module names to adapt; [all-linear] = every linear layer but the output head")
    target_parameters: List[str] = opt([], "3-D weights to adapt by name, e.g. [mlp.experts.gate_up_proj, "
                                       "mlp.experts.down_proj]: the fused experts of a mixture-of-experts model "
                                       "(transformers 5 stores them as parameters, not linear layers)")
    bias: str = opt("none", "train biases too", ["none", "all", "lora_only"])
    use_rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r)")
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA): slower, sometimes better at low rank; vLLM cannot serve it")
    modules_to_save: List[str] = opt([], "modules trained in full and saved with the adapter, e.g. [lm_head]; "
                                     "vLLM cannot load such adapters")


@dataclass
class Columns:
    """The dataset's column for each field a format reads, where its name differs (null = the same name)."""
    messages: Optional[str] = opt(None, "column holding the role/content list")
    conversations: Optional[str] = opt(None, "column holding the from/value list (sharegpt)")
    instruction: Optional[str] = opt(None, "column holding the instruction, e.g. question")
    input: Optional[str] = opt(None, "column holding the optional input / context")
    output: Optional[str] = opt(None, "column holding the answer, e.g. response")
    prompt: Optional[str] = opt(None, "column holding the prompt")
    completion: Optional[str] = opt(None, "column holding the completion")
    text: Optional[str] = opt(None, "column holding the raw text")
    chosen: Optional[str] = opt(None, "column holding the preferred answer (preference data)")
    rejected: Optional[str] = opt(None, "column holding the answer not preferred (preference data)")

    def mapping(self) -> dict[str, str]:
        """{our name: the dataset's column} for the fields that are renamed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass
class SourceConfig:
    """One of several training sources mixed by weight (data.sources)."""
    path: str = opt(MISSING, "a .jsonl/.json/.csv/.parquet file, a folder of them, or a Hub dataset id")
    weight: float = opt(1.0, "share of the training rows: weight / sum of weights (small sources repeat)", min=0,
                        min_exclusive=True)
    name: Optional[str] = opt(None, "Hub dataset configuration name")
    split: str = opt("train", "split to train on")
    revision: Optional[str] = opt(None, "Hub dataset revision")
    format: str = opt("auto", "row format of this source", DATA_FORMATS)
    columns: Columns = field(default_factory=Columns)


@dataclass
class DataConfig:
    path: Optional[str] = opt(None, "training data: a .jsonl/.json/.csv/.parquet file, a folder of them, or a Hub dataset id")
    sources: List[SourceConfig] = field(default_factory=list, metadata={"help": "several sources mixed by weight, "
                                        "instead of path: [{path: a.jsonl, weight: 3}, {path: org/dataset, split: train}]"})
    format: str = opt("auto", "row format; auto = the one most rows have every field of", DATA_FORMATS)
    columns: Columns = field(default_factory=Columns)
    bad_rows: str = opt("error", "a malformed row stops the run (error, naming file and line) or is dropped and counted", ["error", "drop"])
    name: Optional[str] = opt(None, "Hub dataset configuration name")
    split: str = opt("train", "split of `path` to train on")
    revision: Optional[str] = opt(None, "Hub dataset revision")
    eval_path: Optional[str] = opt(None, "eval data file or Hub id; null = `path` again (with eval_split) or a held-out fraction")
    eval_split: Optional[str] = opt(None, "split for evaluation; null = hold out eval_fraction of the training split")
    eval_fraction: float = opt(0.05, "fraction of training rows held out for eval when no eval split is given", min=0, max=0.5)
    max_samples: Optional[int] = opt(None, "use only the first N training rows", min=1)
    eval_max_samples: Optional[int] = opt(200, "use only the first N eval rows", min=1)
    max_length: int = opt(2048, "tokens per training sequence", min=8)
    too_long: str = opt("drop", "rows longer than max_length: drop them, truncate them, or stop with an error",
                        ["drop", "truncate", "error"])
    chat_template: Optional[str] = opt(None, "null = the tokenizer's own template (plain if it has none); a bundled one "
                                       "(plain, chatml, llama2, llama3, mistral); or one of the tokenizer's named "
                                       "variants (e.g. tool_use)")
    train_on_inputs: bool = opt(False, "compute the loss on every token, not only on the assistant's replies")
    turns: str = opt("all", "assistant turns trained: all, each in its inference context (one sequence per turn where "
                     "the template renders history otherwise, e.g. Qwen3); or only the last", ["all", "last"])
    system_prompt: str = opt("keep", "keep system messages, or fold them into the first user turn (for templates "
                             "that refuse a system role)", ["keep", "fold"])
    max_drop_fraction: float = opt(0.1, "stop when more than this share of the rows is dropped for being longer than "
                                   "max_length (data.too_long=drop)", min=0, max=1)
    packing: bool = opt(False, "pack several rows into each sequence (best-fit; no attention across rows)")
    padding_free: Optional[bool] = opt(None, "without packing: concatenate each micro-batch's rows instead of padding "
                                       "them (position ids keep them apart): the same loss, no compute on padding; "
                                       "null = on where this model's own forward gives the same logits both ways "
                                       "(checked on a few rows before training)")
    num_proc: Optional[int] = opt(None, "processes for tokenization (results are cached either way)", min=1)


@dataclass
class TrainConfig:
    objective: str = opt("sft", "what is learned: sft = the data's replies (supervised fine-tuning); dpo = to prefer "
                         "each pair's chosen answer over its rejected one, against a reference (Direct Preference "
                         "Optimization; with LoRA the reference is the model with the adapter off: no second copy); "
                         "orpo = the chosen answers' cross-entropy plus an odds-ratio preference term, no reference "
                         "(Odds Ratio Preference Optimization: SFT and preference in one run)", ["sft", "dpo", "orpo"])
    beta: float = opt(0.1, "train.objective=dpo: how far from the reference the model may move to prefer the chosen "
                      "answers (smaller: further); orpo: the odds-ratio term's weight (ORPO's lambda)", min=0,
                      min_exclusive=True)
    sft_weight: float = opt(0.0, "train.objective=dpo: also this times the chosen answers' cross-entropy (RPO, TRL's "
                            "loss_type [sigmoid, sft]): the chosen answers stay likely while the rejected fall, "
                            "which keeps greedy answers sound", min=0)
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", min=0)
    max_steps: int = opt(-1, "optimizer steps; -1 = run `epochs`")
    micro_batch_size: int = opt(4, "sequences per forward pass", min=1)
    grad_accum: int = opt(4, "micro-batches per optimizer step; effective batch = micro_batch_size x grad_accum", min=1)
    learning_rate: float = opt(2e-4, "peak learning rate", min=0, min_exclusive=True)
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup", ["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up", min=0, max=0.5)
    weight_decay: float = opt(0.0, "decoupled weight decay", min=0)
    max_grad_norm: float = opt(0.3, "gradient clipping norm (0.3 as in the QLoRA paper)", min=0)
    optim: str = opt("paged_adamw_8bit", "optimizer; the paged 8-bit AdamW of bitsandbytes saves the most memory", OPTIMIZERS)
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (non-reentrant): much less memory, ~1/3 more compute")
    precision: str = opt("auto", "auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU", ["auto", "bf16", "fp16", "fp32"])
    master_weights: str = opt("fp32", "full fine-tuning (lora=off): fp32 = mixed precision, fp32 weights, gradients and "
                              "optimizer states with 16-bit autocast (the standard); 16bit = bf16 weights, gradients and "
                              "states (half the memory), which loses every update below a weight's bf16 spacing unless "
                              "train.optim=adamw_kahan", ["fp32", "16bit"])
    activation_offloading: bool = opt(False, "move the activations kept for the backward pass to CPU RAM while the "
                                      "forward runs and back for the backward (TRL's, on CUDA streams: overlapped "
                                      "with compute): long sequences at a fraction of the GPU memory")
    liger_kernel: Optional[bool] = opt(None, "Liger's fused Triton kernels (CUDA only; pip install 'finetune[gpu]'); "
                                       "null = on where they were measured to help with the same losses (the Llama "
                                       "family on a CUDA GPU, liger-kernel installed), else off")
    compile: bool = opt(False, "torch.compile the model (CUDA; the first steps are slower while it compiles)")
    seed: int = opt(42, "seed for adapter init, data order and dropout", min=0, max=SEED_MAX)
    logging_steps: int = opt(10, "log loss, lr and throughput every N steps", min=1)
    eval_steps: int = opt(0, "also evaluate every N steps during training; 0 = only before and after", min=0)
    save_steps: int = opt(200, "write a resumable checkpoint every N steps", min=1)
    save_total_limit: int = opt(2, "checkpoints kept", min=1)
    eval_batch_size: int = opt(8, "sequences per eval forward pass", min=1)
    max_bad_steps: int = opt(0, "optimizer steps with a NaN/inf loss or gradient to skip before the run stops", min=0)
    allow_cpu: bool = opt(False, "train on the CPU even when no GPU is found and `plan` estimates over an hour of "
                          "training there (small models train on a CPU without it)")
    auto_fit: bool = opt(False, "before training, pick the largest micro-batch that fits the local GPU (and checkpointing "
                         "off where it fits); the effective batch stays the same (see the plan verb)")


@dataclass
class EvalConfig:
    exact_match_samples: int = opt(0, "eval rows answered greedily and scored by exact match, before and after training; 0 = off", min=0)
    max_new_tokens: int = opt(64, "token limit of each generated answer", min=1)
    batch_size: int = opt(16, "prompts generated together", min=1)
    quant: List[str] = opt([], "`eval`: precisions to compare the adapter at, e.g. [nf4,int8,none,gguf:q4_k_m] (the "
                           "unquantized base is the reference; gguf:LEVEL = the run's merged model as a llama.cpp file "
                           "of that level, run by llama.cpp); [] = the precision it was trained at",
                           ["nf4", "int8", "none", *(f"gguf:{level}" for level in GGUF_LEVELS)])
    task: str = opt("none", "`eval`: a task metric from the generated answers besides exact match; number_words = the "
                    "answer names the reference's number, however spelled (the demo task)", ["none", "number_words"])
    harness_tasks: List[str] = opt([], "`eval`: lm-evaluation-harness tasks to run on the model, e.g. [hellaswag] "
                                   "(pip install 'finetune[harness]')")
    harness_include: Optional[str] = opt(None, "`eval`: a folder of your own lm-evaluation-harness task YAMLs")
    harness_limit: Optional[int] = opt(None, "`eval`: at most this many examples per harness task", min=1)


@dataclass
class TrackingConfig:
    backend: str = opt("none", "experiment tracker", ["none", "wandb"])
    project: str = opt("finetune", "W&B project")
    entity: Optional[str] = opt(None, "W&B team or user")
    name: Optional[str] = opt(None, "W&B run name; null = the run directory's name")
    group: Optional[str] = opt(None, "W&B group")
    tags: List[str] = opt([], "W&B tags")
    mode: str = opt("online", "W&B mode; the WANDB_MODE environment variable wins", ["online", "offline", "disabled"])
    log_model: bool = opt(False, "log the adapter as a W&B model artifact at the end of training")


@dataclass
class ExportConfig:
    merge: bool = opt(False, "also write merged/: a plain transformers model with the adapter merged in (never into 4-bit weights)")
    merge_base: str = opt("auto", "what the adapter is merged into: original = the base reloaded in merge_dtype; "
                          "dequantized = the 4-bit base as trained, dequantized; auto = whichever is closer to the "
                          "model as trained", ["auto", "original", "dequantized"])
    merge_dtype: str = opt("bfloat16", "dtype of the merged weights", ["bfloat16", "float16", "float32"])
    device: str = opt("cpu", "where the merge and its check run: cpu = in CPU memory, so merging needs no GPU memory "
                      "at all (the only choice so far)", ["cpu"])
    check_samples: int = opt(4, "eval rows on which each merged model is compared with the 4-bit model as trained", min=1)
    max_kl: float = opt(0.05, "largest mean KL divergence (nats per token) between the merged model and the model as "
                        "trained; above it merged/ is not written (a GGUF file above it is kept and reported)",
                        min=0, min_exclusive=True)
    gguf: List[str] = opt([], "also write llama.cpp files of the merged model, gguf/NAME-LEVEL.gguf, one per level, e.g. "
                          "[f16,q8_0,q4_k_m], each measured against the model as trained, with an Ollama Modelfile "
                          "(pip install 'finetune[gguf]'); needs export.merge=true", GGUF_LEVELS)
    gguf_adapter: bool = opt(False, "also write the adapter alone as a GGUF for llama.cpp's --lora, gguf/NAME-lora-f16.gguf")


@dataclass
class HubConfig:
    push: bool = opt(False, "publish to the Hugging Face Hub at the end of training")
    repo_id: Optional[str] = opt(None, "the model repository, user/name or org/name (created if missing)")
    private: bool = opt(True, "create the repository private")
    revision: Optional[str] = opt(None, "branch to commit to (created from main if missing); null = main")
    model: str = opt("adapter", "what to upload: the adapter (a few MB) or the merged model", ["adapter", "merged"])
    license: Optional[str] = opt(None, "license in the model card; null = the base model's")
    commit_message: Optional[str] = opt(None, "commit message; null = 'finetune: RECIPE adapter|merged model'")
    gguf: bool = opt(False, "also upload gguf/ (the GGUF files, their fidelity.json and the Ollama Modelfile)")


GPU_PRESETS = ["auto", "t4", "rtx3060", "rtx4060ti", "rtx3090", "rtx4090", "l4", "a10", "a6000", "a100-40gb", "a100-80gb",
               "h100", "h200"]


@dataclass
class PlanConfig:
    gpu: str = opt("auto", "GPU to plan for: auto = the local one, or a preset", GPU_PRESETS)
    mode: str = opt("train", "plan training, or inference (weights + KV cache)", ["train", "inference"])
    format: str = opt("table", "print a table, or JSON for scripts", ["table", "json"])
    efficiency: Optional[float] = opt(None, "share of the GPU's dense 16-bit peak FLOP/s reached; null = 0.42 for nf4, "
                                      "0.17 for int8, 0.56 for 16-bit (scripts/plan_vs_published.py)", min=0, max=1,
                                      min_exclusive=True)
    gpus: int = opt(1, "GPUs the run is launched on (accelerate launch --num_processes N): memory is planned per GPU",
                    min=1, max=64)
    sharding: str = opt("ddp", "with gpus > 1: ddp = each GPU holds the whole model; fsdp = weights, gradients and "
                        "optimizer states sharded over the GPUs", ["ddp", "fsdp"])
    loss: str = opt("auto", "how the run computes its logits and loss: auto = this installation's (TRL's fused LM head "
                    "where TRL has it, else full fp32 logits); full, logits16 (16-bit logits, fp32 loss per chunk) or "
                    "chunked (no whole logits) to plan another stack", ["auto", "full", "logits16", "chunked"])
    solve: str = opt("none", "also find the longest sequence (max_seq) or the largest micro-batch (max_batch) that fits "
                     "plan.gpu, all else as set", ["none", "max_seq", "max_batch"])
    pcie_gbs: float = opt(25.0, "GB/s between CPU RAM and the GPU (PCIe 4.0 x16, pinned): what offloaded layers, "
                          "offloaded activations and paged optimizer states move at", min=0, min_exclusive=True)
    disk_gbs: float = opt(3.0, "GB/s read from disk (an NVMe SSD): what layers offloaded to disk stream in at", min=0,
                          min_exclusive=True)


@dataclass
class PruneConfig:
    layers: Optional[int] = opt(None, "`prune`: drop this many of the least influential decoder layers", min=1)
    target_params: Optional[float] = opt(None, "`prune`: drop the fewest least influential layers that bring the model "
                                         "to this many parameters or fewer (instead of prune.layers)", min=1)
    samples: int = opt(32, "`prune`: eval rows the layers' block influence is measured on", min=1)
    output_dir: Optional[str] = opt(None, "`prune`: where the pruned model is written; null = RUN_DIR/pruned (run=), "
                                    "or output_dir/pruned")
    heal: str = opt("none", "`prune`: then recover quality with a LoRA run of the recipe on the pruned model (sft), "
                    "the same run taught by the unpruned model (distill: distill.* settings), or not",
                    ["none", "sft", "distill"])


@dataclass
class DistillConfig:
    teacher: Optional[str] = opt(None, "`distill`: the teacher, a run directory (its merged/ model, else its base with "
                                 "the adapter) or a model (Hub id or folder); the recipe's model is the student")
    top_k: int = opt(32, "`distill`: the teacher's most probable next words kept per trained token (stored on disk)",
                     min=1)
    alpha: float = opt(0.5, "`distill`: the loss is alpha x divergence from the teacher + (1 - alpha) x cross-entropy "
                       "on the data's tokens", min=0, max=1)
    loss: str = opt("forward", "`distill`: forward KL (teacher || student: the classic), reverse KL (student || "
                    "teacher: mode seeking) or jsd (Jensen-Shannon)", ["forward", "reverse", "jsd"])
    temperature: float = opt(1.0, "`distill`: both distributions softened by this temperature (the loss is scaled "
                             "by its square)", min=0, min_exclusive=True)


@dataclass
class FinetuneConfig:
    recipe: str = opt("tiny_qlora", "the recipe this run was composed from (set by recipe=NAME)")
    output_dir: str = opt("outputs/${recipe}/${now:%Y-%m-%d_%H-%M-%S}", "run directory")
    overwrite: bool = opt(False, "replace an existing non-empty output_dir")
    resume: bool = opt(False, "continue an existing output_dir from its last checkpoint")
    init_from: Optional[str] = opt(None, "a finished LoRA run directory whose adapter this run keeps training (e.g. DPO "
                                   "after SFT), on that run's base model; null = a new adapter")
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


GROUPS = [f.name for f in dataclasses.fields(FinetuneConfig) if dataclasses.is_dataclass(f.default_factory)]


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


def schema_keys(cls: type = FinetuneConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of the schema, dotted ('train.learning_rate'), with its field."""
    keys = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            keys.update(schema_keys(f.default_factory, prefix + f.name + "."))
        else:
            keys[prefix + f.name] = f
    return keys


def check_field(key: str, f: dataclasses.Field, value: Any) -> Optional[str]:
    meta = f.metadata
    if value is None:
        return None
    if meta.get("choices") and isinstance(value, (list, tuple)):  # a list: each of its values
        return next((check_field(key, f, v) for v in value if check_field(key, f, v)), None)
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        null = " (or null)" if f.default is None else ""
        return f"{key}={value} is not allowed: choose one of {allowed}{null}.{closest(str(value), map(str, meta['choices']))}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value} is not a number: give a finite value ({meta.get('help', '')})."
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            return f"{key}={value} is out of range: it must be {'>' if meta.get('min_exclusive') else '>='} {lo}."
        if hi is not None and value > hi:
            return f"{key}={value} is out of range: it must be <= {hi}."
    return None


def leaf_values(obj) -> dict[str, Any]:
    """{dotted key: value} of every leaf field of the dataclass instance `obj`."""
    values = {}
    for key in schema_keys(type(obj)):
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


def field_problems(obj, prefix: str = "") -> list[Optional[str]]:
    """The choice and range check of every leaf field of the dataclass instance `obj`."""
    fields = schema_keys(type(obj))
    return [check_field(prefix + key, fields[key], value) for key, value in leaf_values(obj).items()]


def validate(cfg: FinetuneConfig) -> None:
    """Settle the defaults that follow another key, check every field, then the combinations across groups;
    raise one UserError listing all problems."""
    cfg.quant.double_quant = cfg.quant.nested
    problems = (field_problems(cfg) + training_problems(cfg) + objective_problems(cfg) + output_problems(cfg)
                + data_problems(cfg) + offload_problems(cfg.model))
    problems = [p for p in problems if p]
    if problems:
        raise UserError(*problems)


def training_problems(cfg: FinetuneConfig) -> list[str]:
    """Base precision, adapter, schedule and run directory settings that contradict each other."""
    q, lora, t = cfg.quant, cfg.lora, cfg.train
    problems = []
    if q.method != "none" and not lora.enabled:
        problems.append(f"quant={q.method} with lora.enabled=false: quantized base weights cannot be trained. "
                        "Set lora.enabled=true, or quant=none for full fine-tuning.")
    if q.method != "nf4" and q.double_quant:
        problems.append(f"quant.double_quant=true is a 4-bit (nf4) option but quant={q.method} (8-bit or none): "
                        "use quant=nf4, or set quant.double_quant=false.")
    compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(q.compute_dtype)
    if q.method == "nf4" and compute and t.precision != "auto" and compute != t.precision:
        problems.append(f"quant.compute_dtype={q.compute_dtype} but train.precision={t.precision}: the 4-bit layers "
                        "would compute in another dtype than training. Set both the same, or quant.compute_dtype=auto.")
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append("train.max_steps and train.epochs are both 0 or less: set one of them, e.g. train.epochs=1.")
    if t.max_steps == 0:
        problems.append("train.max_steps=0 trains nothing: use -1 to train for train.epochs, or a positive number.")
    if cfg.resume and cfg.overwrite:
        problems.append("resume=true and overwrite=true contradict each other: resume continues output_dir, "
                        "overwrite deletes it. Pick one.")
    if t.master_weights == "16bit" and lora.enabled:
        problems.append("train.master_weights=16bit is for full fine-tuning (lora=off); LoRA keeps the frozen base in "
                        "16 bits anyway. Remove it, or set lora=off.")
    if t.master_weights == "16bit" and t.precision in ("fp16", "fp32"):
        problems.append(f"train.master_weights=16bit trains bf16 weights, but train.precision={t.precision}: they need "
                        "bf16 compute (fp16 weights overflow without loss scaling). Set train.precision=bf16 (or auto on a "
                        "GPU with bf16).")
    if lora.use_dora and q.method == "int8":
        problems.append("lora.use_dora=true is not supported on an 8-bit base: use quant=nf4 or quant=none.")
    if lora.target_parameters and (lora.dropout > 0 or lora.use_dora):
        problems.append(f"lora.target_parameters adapts fused expert weights through PEFT's ParamWrapper, which has no "
                        f"dropout or DoRA: set lora.dropout=0{' and lora.use_dora=false' if lora.use_dora else ''}.")
    return problems


def objective_problems(cfg: FinetuneConfig) -> list[str]:
    """Settings that train.objective=dpo|orpo has no use for (they would be ignored), train.sft_weight outside DPO,
    and init_from's adapter."""
    problems = []
    if cfg.init_from and not cfg.lora.enabled:
        problems.append("init_from continues a run's LoRA adapter, and lora.enabled=false trains every weight: "
                        "set lora.enabled=true, or start from a model with model.name_or_path instead.")
    if cfg.train.objective != "dpo" and cfg.train.sft_weight:
        problems.append(f"train.sft_weight={cfg.train.sft_weight:g} weighs a cross-entropy term of the DPO loss, and "
                        f"train.objective={cfg.train.objective} has its own (all of SFT's loss; ORPO's beside its "
                        "odds-ratio term): remove it, or set train.objective=dpo.")
    if cfg.train.objective == "sft":
        return problems
    unused = {"data.packing=true": cfg.data.packing, "data.padding_free=true": cfg.data.padding_free,
              "data.train_on_inputs=true": cfg.data.train_on_inputs, f"distill.teacher={cfg.distill.teacher}":
              cfg.distill.teacher, "train.liger_kernel=true": cfg.train.liger_kernel}
    for key, given in unused.items():
        if given:
            problems.append(f"{key} is for supervised fine-tuning; train.objective={cfg.train.objective} compares "
                            f"whole answers, each pair padded in its own batch row: remove {key.split('=')[0]}.")
    if cfg.train.objective == "orpo" and cfg.train.activation_offloading:
        problems.append("train.activation_offloading=true: TRL's ORPO trainer has no activation offloading. Remove "
                        "it (or use train.objective=dpo, which has).")
    return problems


def output_problems(cfg: FinetuneConfig) -> list[str]:
    """What export, tracking and the Hub are asked to write that the run will not have."""
    q, lora, hub = cfg.quant, cfg.lora, cfg.hub
    problems = []
    if cfg.export.merge and not lora.enabled:
        problems.append("export.merge=true needs LoRA (lora.enabled=true): without an adapter there is nothing to merge.")
    if cfg.export.merge_base == "dequantized" and q.method != "nf4":
        problems.append(f"export.merge_base=dequantized merges into the 4-bit base as trained, but quant={q.method}: "
                        "use export.merge_base=original (or auto).")
    if cfg.tracking.log_model and cfg.tracking.backend != "wandb":
        problems.append("tracking.log_model=true logs the adapter to W&B, but tracking.backend is none: "
                        "use tracking=wandb, or drop tracking.log_model.")
    if hub.push and not hub.repo_id:
        problems.append("hub.push=true needs hub.repo_id=USER/NAME: the repository to publish to.")
    if hub.repo_id and hub.repo_id.count("/") != 1:
        problems.append(f"hub.repo_id={hub.repo_id} is not USER/NAME or ORG/NAME.")
    if hub.push and not lora.enabled:
        problems.append("hub.push=true publishes an adapter or a merged model; a full fine-tune (lora.enabled=false) "
                        "writes model/ instead, which `publish` does not upload yet: upload it with `hf upload`.")
    if hub.push and hub.model == "merged" and not cfg.export.merge:
        problems.append("hub.model=merged publishes merged/, which export.merge=false does not write: "
                        "set export.merge=true (or export=merged), or hub.model=adapter.")
    if cfg.export.gguf and not cfg.export.merge:
        problems.append(f"export.gguf={list(cfg.export.gguf)} converts merged/, which export.merge=false does not write: "
                        "set export.merge=true (or export=merged).")
    if cfg.export.gguf_adapter and not lora.enabled:
        problems.append("export.gguf_adapter=true converts the adapter, and a full fine-tune (lora.enabled=false) has none.")
    if hub.push and hub.gguf and not (cfg.export.gguf or cfg.export.gguf_adapter):
        problems.append("hub.gguf=true uploads gguf/, which the run writes only with export.gguf=[LEVEL,...] or "
                        "export.gguf_adapter=true.")
    return problems


def offload_problems(model: ModelConfig) -> list[str]:
    """model.max_memory: sizes accelerate reads (10GiB, 500MB, a number of bytes), and an offload to limit."""
    given = model.max_memory.given()
    if not given:
        return []
    from accelerate.utils import convert_file_size_to_int  # (imports torch: only when there is a size to read)

    problems = []
    for device, size in given.items():
        try:
            convert_file_size_to_int(str(size))
        except ValueError:
            problems.append(f"model.max_memory.{device}={size} is not a size: write it like 10GiB, 500MB or 2GB.")
    if model.offload == "none":
        problems.append("model.max_memory limits what model.offload places, and model.offload=none: set "
                        "model.offload=auto, cpu or disk.")
    return problems


def data_problems(cfg: FinetuneConfig) -> list[str]:
    """Where the data comes from, and the eval split the other settings need."""
    data = cfg.data
    problems = []
    if data.packing and cfg.model.trust_remote_code:
        problems.append("data.packing=true relies on transformers building per-row attention from position ids, which "
                        "remote modelling code (model.trust_remote_code=true) may not do: set data.packing=false.")
    if bool(data.path) == bool(data.sources):
        problems.append("Give the training data either as data.path or as data.sources (several, mixed by weight), "
                        "not both" + (": set data.path=null to use data.sources." if data.sources else ": neither is set."))
    for i, source in enumerate(data.sources):
        problems += field_problems(source, f"data.sources[{i}].")
    has_eval = bool(data.eval_path or data.eval_split or data.eval_fraction > 0)
    if cfg.train.eval_steps and not has_eval:
        problems.append(f"train.eval_steps={cfg.train.eval_steps} needs an eval split: set data.eval_path, "
                        "data.eval_split or data.eval_fraction > 0, or train.eval_steps=0.")
    if cfg.eval.exact_match_samples and not has_eval:
        problems.append("eval.exact_match_samples > 0 needs an eval split: set data.eval_path, data.eval_split "
                        "or data.eval_fraction > 0.")
    return problems
