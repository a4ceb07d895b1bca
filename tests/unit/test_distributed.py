"""Scale-out pieces that need no second process: the shipped accelerate configs as accelerate reads them,
what each process loads under them, the plan per GPU, and the split of generation between processes.
The 2-process DDP run itself is tests/integration/test_distributed.py; FSDP needs CUDA GPUs."""

import subprocess
import sys
import time

import pytest
import torch

from finetune import distributed, scoring
from finetune.config import QuantConfig
from finetune.distributed import World
from finetune.errors import UserError
from finetune.model import Device, device_map_for, quantization_config
from finetune.plan import make_plan
from finetune.registry import load_config
from tests.helpers import ROOT

CPU = Device("cpu", "cpu", True, "fp32", torch.float32)
GPU = Device("cuda", "NVIDIA H100", True, "bf16", torch.bfloat16)


def launch_env(name: str, processes: int = 2) -> dict:
    """The environment `accelerate launch --config_file configs/accelerate/NAME.yaml` gives each process,
    assembled by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"),
                                               "--num_processes", str(processes), "-m", "finetune"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, fsdp_version", [("ddp", None), ("fsdp", "2"), ("fsdp_qlora", "1")])
def test_shipped_configs_as_accelerate_reads_them(name, fsdp_version, monkeypatch):
    env = launch_env(name)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # precision is the recipe's (train.precision)
    assert env.get("FSDP_VERSION") == fsdp_version
    for key, value in {**env, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    w = distributed.world()
    assert (w.size, w.rank, w.local_rank, w.is_main) == (2, 1, 1, False)
    assert w.strategy == ("ddp" if name == "ddp" else "fsdp")
    if name == "fsdp_qlora":  # the settings FSDP-QLoRA is documented with: flat params of one dtype, rank 0 loads
        assert (env["FSDP_USE_ORIG_PARAMS"], env["FSDP_CPU_RAM_EFFICIENT_LOADING"], env["FSDP_SYNC_MODULE_STATES"],
                env["FSDP_STATE_DICT_TYPE"]) == ("false", "true", "true", "SHARDED_STATE_DICT")
    if name == "fsdp":  # accelerate validates an FSDP2 plugin without a GPU (FSDP1 wants one)
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading


def test_each_process_loads_its_own_model():
    ddp, fsdp = World(2, 1, 1, "ddp"), World(2, 1, 1, "fsdp")
    assert device_map_for(GPU, ddp) == {"": 1}  # rank 1's GPU, the whole 4-bit model
    assert device_map_for(GPU) == {"": 0} and device_map_for(CPU, ddp) == {"": "cpu"}
    assert device_map_for(GPU, fsdp) is None  # accelerate places the shards
    # FSDP shards floating-point tensors only: the packed 4-bit weights are stored in the compute dtype.
    assert quantization_config(QuantConfig(), torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(QuantConfig(), torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_what_a_launch_cannot_do():
    cfg = load_config([])
    with pytest.raises(UserError, match=r"FSDP config .* needs CUDA GPUs.*configs/accelerate/ddp.yaml"):
        distributed.check_launch(cfg, World(2, 0, 0, "fsdp"), "cpu")
    with pytest.raises(UserError, match="quant=int8 cannot be sharded by FSDP"):
        distributed.check_launch(load_config(["quant=int8"]), World(2, 0, 0, "fsdp"), "cuda")
    distributed.check_launch(load_config(["quant=int8"]), World(2, 0, 0, "ddp"), "cpu")  # DDP takes any recipe


def test_fsdp2_refuses_bitsandbytes_optimizers(monkeypatch):
    """Seen on an H200: bitsandbytes' 8-bit AdamW update got FSDP2's DTensor parameters and crashed on its first step."""
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=r"train.optim=paged_adamw_8bit is a bitsandbytes optimizer.*adamw_torch"):
        distributed.check_launch(load_config(["quant=none"]), World(2, 0, 0, "fsdp"), "cuda")
    distributed.check_launch(load_config(["quant=none", "train.optim=adamw_torch"]), World(2, 0, 0, "fsdp"), "cuda")
    monkeypatch.setenv("FSDP_VERSION", "1")  # fsdp_qlora.yaml: FSDP1's flat parameters are plain tensors
    distributed.check_launch(load_config([]), World(2, 0, 0, "fsdp"), "cuda")


def test_an_fsdp1_wrapped_adapter_is_exported_whole(tmp_path, monkeypatch):
    """FSDP1 (fsdp_qlora.yaml) wraps each decoder layer; PEFT finds the adapter by module names that then carry the
    wrapper. Seen on an H200: the adapter was saved empty. Here FSDP1 runs on CPU (gloo, one process): the model
    export gets saves every LoRA tensor, with the trained values, under names plain PEFT loads."""
    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # "trained": B is no longer zero
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                       device_id=torch.device("cpu"))
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
            state = wrapped.state_dict()  # what accelerator.get_state_dict gathers
        trainer = type("Trainer", (), {"model": wrapped})()
        distributed.model_to_export(World(1, 0, 0, "fsdp"), trainer).save_pretrained(tmp_path, state_dict=state)
    finally:
        dist.destroy_process_group()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), tmp_path)
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert len(loaded) == len(trained) == 28
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)


def test_plan_per_gpu():
    base = ["recipe=qlora_llama7b", "plan.gpu=rtx3090"]
    one, ddp, fsdp = (make_plan(load_config([*base, *extra])) for extra in
                      ([], ["plan.gpus=2"], ["plan.gpus=2", "plan.sharding=fsdp"]))
    # DDP: every GPU holds the whole model, plus a copy of the gradients in the all-reduce buckets.
    lora_grads = next(v for k, v in one["memory_gib"].items() if k.startswith("LoRA gradients"))
    assert ddp["peak_gib"] == pytest.approx(one["peak_gib"] + lora_grads, abs=0.01)
    # FSDP: the 4-bit weights halve per GPU; one gathered layer pair and the whole root unit come back.
    weights = [v for k, v in one["memory_gib"].items() if k.startswith("base weights")][0]
    assert [v for k, v in fsdp["memory_gib"].items() if k.startswith("base weights")][0] == pytest.approx(weights / 2)
    assert fsdp["peak_gib"] < one["peak_gib"] - weights / 4
    # Two GPUs: twice the sequences per step, twice the tokens/s (an upper bound), twice the GPU-hours per hour.
    assert ddp["tokens_per_second"] == pytest.approx(2 * one["tokens_per_second"])
    assert ddp["gpu_hours"] == pytest.approx(2 * ddp["hours"])


def test_a_model_too_big_for_one_gpu_gets_the_fsdp_command():
    plan = make_plan(load_config(["recipe=qlora_llama7b", "model=llama2_70b", "plan.gpu=rtx3090"]))
    assert not plan["fits"]
    shard = plan["suggestions"][-1]
    assert shard["overrides"] == ["plan.gpus=4", "plan.sharding=fsdp"] and shard["peak_gib"] <= 23.7
    assert "configs/accelerate/fsdp_qlora.yaml --num_processes 4" in shard["change"]
    check = make_plan(load_config(["recipe=qlora_llama7b", "model=llama2_70b", "plan.gpu=rtx3090", *shard["overrides"]]))
    assert check["fits"] and check["peak_gib"] == pytest.approx(shard["peak_gib"])


def test_generation_is_split_between_processes_and_gathered_in_order(monkeypatch):
    """7 prompts over 3 processes: 3 each (the last padded with a repeat, so every process makes the same
    number of generate calls), gathered back as the 7 answers in order."""
    prompts = [[{"role": "user", "content": str(i)}] for i in range(7)]
    monkeypatch.setattr(scoring, "generate_answers", lambda m, t, convs, n, b, **kw: [c[0]["content"] for c in convs])
    made = {}
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: World(3, rank, rank, "ddp"))
        monkeypatch.setattr(distributed, "gather", lambda items, rank=rank: made.setdefault(rank, items) and [])
        scoring.answers_across_processes(None, None, prompts, 4, 2)
    assert [len(v) for v in made.values()] == [3, 3, 3]
    everyone = [a for rank in range(3) for a in made[rank]]
    monkeypatch.setattr(distributed, "gather", lambda items: everyone)
    assert scoring.answers_across_processes(None, None, prompts, 4, 2) == [str(i) for i in range(7)]


def test_one_process_needs_no_group():
    assert distributed.world().size == 1
    assert distributed.on_main(lambda: 41 + 1) == 42
    assert distributed.broadcast("x") == "x" and distributed.any_process(True) and not distributed.any_process(False)


def test_the_resume_command_repeats_the_launch(monkeypatch):
    """A preempted process of `accelerate launch` prints its launcher's own command, read from the parent."""
    from finetune.__main__ import launcher

    assert launcher(World(1, 0, 0, "single")) == "python -m finetune"
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "launch", "--config_file",
                               "configs/accelerate/ddp.yaml", "--num_processes", "2", "-m", "finetune"])
    try:
        time.sleep(0.2)
        monkeypatch.setattr("os.getppid", lambda: parent.pid)
        assert launcher(World(2, 0, 0, "ddp")) == ("accelerate launch --config_file configs/accelerate/ddp.yaml "
                                                    "--num_processes 2 -m finetune")
    finally:
        parent.kill()
    monkeypatch.setattr("os.getppid", lambda: 2**22 + 12345)  # no such process: a template to fill in
    assert launcher(World(2, 0, 0, "ddp")).startswith("accelerate launch --num_processes 2")


def test_only_training_is_launched_on_several_processes(monkeypatch, capsys):
    from finetune.__main__ import main

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert main(["plan", "plan.gpu=h100"]) == 2
    assert "`plan` runs in one process: python -m finetune plan" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other processes read the same command line: rank 0 alone says it
    assert main(["plan", "plan.gpu=h100"]) == 2
    assert capsys.readouterr().err == ""


def test_fsdp_on_one_gpu_is_still_fsdp(monkeypatch):
    """accelerate wraps the model in FSDP even for one process: the FSDP path (quant storage, no device map)
    is taken, so one GPU can check it."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    w = distributed.world()
    assert (w.strategy, w.distributed) == ("fsdp", False)
    assert device_map_for(GPU, w) is None
