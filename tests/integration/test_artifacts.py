"""What a run leaves behind, used the way users use it: the merge fidelity, adapters other tools load,
`export`, `generate` and `publish` through the CLI's main() (in this process), publishing with
huggingface_hub's own client against a local stand-in of the Hub, and the adapter logged to W&B."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import DEMO_SAVE, DEMO_STEPS
from tests.helpers import read_wandb_log
from tests.hub_standin import HubStandIn

pytestmark = pytest.mark.slow
DEMO_BASE = Path(__file__).resolve().parents[2] / "finetune" / "assets" / "tiny_llama"
TOKEN = "hf_tEsTsEcReT0123456789abcdefghijklmn"


def summary_of(path):
    return json.loads((path / "summary.json").read_text())


def hub_env(hub, token=TOKEN):
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": None, "HF_HUB_DISABLE_XET": "1"}


@pytest.fixture(autouse=True)
def hub_as_configured_here(monkeypatch, tmp_path):
    """huggingface_hub reads its offline and Xet switches and its token file once, at import: in this process they
    are set as hub_env() sets them for a fresh one (the stand-in speaks the Hub's API and LFS, not Xet). No token
    file: a token comes from HF_TOKEN or nowhere."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# ---- merge fidelity -----------------------------------------------------------------------------

def test_auto_merge_measures_both_bases_and_keeps_the_closer(demo_run):
    s = summary_of(demo_run)
    f = s["merge_fidelity"]
    # the dequantized NF4 base is the function trained: only bf16 rounding separates them; the original
    # 16-bit base lacks the quantization error the adapter was trained on
    assert 0 <= f["dequantized"]["mean_kl"] < f["original"]["mean_kl"]
    assert s["merge_base"] == f["merge_base"] == min(("original", "dequantized"), key=lambda b: f[b]["mean_kl"])
    assert s["merge_mean_kl"] == f[s["merge_base"]]["mean_kl"] < 0.05
    assert s["merge_eval_loss"] == pytest.approx(s["merge_reference_eval_loss"], rel=0.1)
    card = (demo_run / "merged" / "README.md").read_text()
    assert "## Merge fidelity" in card and f"{f['original']['mean_kl']:.3g}" in card and "dequantized (kept)" in card


def test_the_merged_weights_are_16_bit_never_4_bit(demo_run):
    with safe_open(str(demo_run / "merged" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        names = list(f.keys())
    assert dtypes == {torch.bfloat16}
    assert not any("lora_" in n or "absmax" in n or "quant" in n for n in names)


def test_export_of_a_checkpoint_with_a_chosen_base(demo_run, cli):
    result = cli("export", f"run={demo_run}", f"checkpoint={DEMO_SAVE}", "export.merge_base=original",
                     "model.hub_id=demo-org/tiny-llama")
    assert result.returncode == 0, result.stderr[-2000:]
    out = demo_run / "exports" / f"checkpoint-{DEMO_SAVE}"
    assert "merged into the original base" in result.stdout and str(out) in result.stdout
    s = summary_of(out)
    assert s["merge_base"] == "original" and set(s["merge_fidelity"]) >= {"original", "reference_eval_loss"}
    assert "dequantized" not in s["merge_fidelity"] and s["checkpoint"] == f"checkpoint-{DEMO_SAVE}" and s["eval_loss"] is None
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(DEMO_BASE)  # the local copy names what loads here
    # the checkpoint's adapter, not the final one
    final = safe_open(str(demo_run / "adapter" / "adapter_model.safetensors"), "pt")
    early = safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt")
    key = next(k for k in final.keys() if "lora_B" in k)
    assert not torch.equal(final.get_tensor(key), early.get_tensor(key))


def test_a_merge_too_far_from_the_trained_model_is_not_written(demo_run, cli):
    result = cli("export", f"run={demo_run}", "checkpoint=last", "export.max_kl=1e-12")
    assert result.returncode == 2
    assert "error: The merged model is further from the model as trained than export.max_kl=1e-12" in result.stderr
    assert f"export run={demo_run} checkpoint=last export.merge_dtype=float32" in result.stderr
    assert "Traceback" not in result.stderr
    out = demo_run / "exports" / f"checkpoint-{DEMO_STEPS}"
    assert not (out / "merged").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert summary_of(out)["merge_mean_kl"] > 1e-12  # the figures are kept


# ---- adapters other tools load ------------------------------------------------------------------

def test_a_local_adapter_loads_by_itself_and_warns_what_publish_will_not_name(demo_run):
    """adapter_config.json names the local base, so AutoPeftModelForCausalLM loads it; what `publish` uploads names
    model.hub_id or nothing (test_publish_uploads_the_adapter_and_its_card_in_one_commit)."""
    from peft import AutoPeftModelForCausalLM

    config = json.loads((demo_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(DEMO_BASE) and not config.get("modules_to_save")
    model = AutoPeftModelForCausalLM.from_pretrained(demo_run / "adapter")
    assert any("lora_B" in n for n, _ in model.named_parameters())
    stderr = (demo_run.parent / "train.stderr").read_text()
    assert "The base model is a local folder" in stderr and "model.hub_id=ORG/NAME" in stderr
    assert not (demo_run / "adapter" / "training_args.bin").exists()  # no pickle next to the weights


def test_generation_config_ends_at_the_templates_eos(demo_run):
    from transformers import AutoTokenizer, GenerationConfig

    for folder in ("adapter", "merged"):
        tok = AutoTokenizer.from_pretrained(demo_run / folder)
        gen = GenerationConfig.from_pretrained(demo_run / folder)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        assert eos[0] == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id != tok.eos_token_id
        # the template's reply ends with that token: what training taught the model to emit
        text = tok.apply_chat_template([{"role": "user", "content": "Write 3 in words."},
                                        {"role": "assistant", "content": "three"}], tokenize=False)
        assert text.rstrip().endswith(tok.eos_token)


# ---- generate -----------------------------------------------------------------------------------

def test_generate_answers_in_the_chat_format_and_stops_at_eos(demo_run, cli):
    result = cli("generate", f"run={demo_run}", "prompt=Write 512 in words.", "max_new_tokens=40")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    answer = lines[lines.index(">>> Write 512 in words.") + 1]
    assert answer.strip() and "<" not in answer and set(answer.split()) <= NUMBER_WORDS
    n = int(lines[lines.index(">>> Write 512 in words.") + 2].split()[0].strip("["))
    assert "stopped at EOS" in result.stdout and n < 40  # ended by itself, long before the limit


NUMBER_WORDS = set("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                   "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                   "hundred".split())


def test_generate_compare_shows_base_and_tuned_side_by_side(demo_run, cli, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write 77 in words."}\n{"prompt": "Spell out the number 903."}\n')
    result = cli("generate", f"run={demo_run}", f"prompts_file={prompts}", "compare=true", "quant=none",
                     env={"COLUMNS": "90"})
    assert result.returncode == 0, result.stderr[-2000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("base ")]
    assert len(headers) == 2 and all(h.split() == ["base", "|", "tuned"] for h in headers)
    rows = [line for line in result.stdout.splitlines() if " | " in line and not line.startswith("base ")]
    base, tuned = zip(*(r.split(" | ", 1) for r in rows))
    assert any(b.strip() != t.strip() for b, t in zip(base, tuned))  # the adapter changes the answers


def test_generate_from_the_merged_model_with_sampling(demo_run, cli):
    result = cli("generate", f"run={demo_run}", "prompt=Write 40 in words.", "model=merged", "do_sample=true",
                     "temperature=0.5", "seed=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped at EOS" in result.stdout


def test_generate_streams_layers_offloaded_to_disk_and_answers_the_same(demo_run, cli, tmp_path, caplog):
    """model.offload=disk with a CPU RAM budget of 2 MB (embeddings, head and one of four layers): accelerate streams the other layers
    in from disk for every forward (transformers reads them from the checkpoint's own safetensors files), with the
    adapter on top, and the greedy answers do not change."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write 77 in words.\nSpell out the number 903.\n")
    answers = {}
    for name, extra in [("whole", []), ("disk", ["model.offload=disk", "model.max_memory.cpu=2MB"])]:
        caplog.clear()
        (tmp_path / "cwd").mkdir(exist_ok=True)
        result = cli("generate", f"run={demo_run}", f"prompts_file={prompts}", "quant=none", "stream=false", *extra,
                     cwd=tmp_path / "cwd")
        assert result.returncode == 0, result.stderr[-2000:]
        answers[name] = [line for line in result.stdout.splitlines() if line.strip()]
    assert "model.offload=disk: 3 modules on cpu, 5 modules on disk" in caplog.text
    assert answers["disk"] == answers["whole"] and len(answers["whole"]) >= 4
    assert not any((tmp_path / "cwd").iterdir())  # PEFT's rewritten offload files went to a temporary folder


@pytest.mark.parametrize("args, message", [
    (["prompt=hi", "model.offload=disk"], "model.offload=disk on a CPU: bitsandbytes' nf4 layers cannot stream in"),
    (["prompt=hi", "quant=none", "model.offload=cpu", "model.max_memory.cpu=2MB"],
     "does not fit CPU RAM (model.max_memory.cpu=2MB): raise model.max_memory.cpu, or let the rest go to disk"),
    (["prompt=hi", "quant=none", "model.offload=disk", "model.max_memory.cpu=1MB"],
     "model.max_memory.cpu=1MB leaves no layer of"),
    (["prompt=hi", "model.offload=cpu", "model.max_memory.gpu=lots"], "model.max_memory.gpu=lots is not a size"),
    (["prompt=hi", "temprature=0.1"], "Unknown key 'temprature' for `generate`. Did you mean 'temperature'?"),
    (["prompt=hi", "max_new_tokens=many"], "max_new_tokens=many: expected an integer"),
    (["prompt=hi", "quant=fp8"], "quant=fp8 is not allowed: choose one of nf4, int8, none"),
    ([], 'Give either prompt="..." or prompts_file=FILE'),
    (["prompts_file=/nonexistent/p.txt"], "prompts_file=/nonexistent/p.txt: no such file"),
    (["prompt=hi", "checkpoint=7"], "checkpoint=7: no such checkpoint"),
])
def test_generate_user_errors(demo_run, args, message, capsys):
    from finetune.__main__ import main

    code = main(["generate", f"run={demo_run}", *args])  # in-process: an uncaught exception would fail the test
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_verbs_on_a_folder_that_is_no_run(cli, tmp_path):
    result = cli("generate", f"run={tmp_path}", "prompt=hi")
    assert result.returncode == 2 and "no config.yaml, so it is not a finetune run directory" in result.stderr
    result = cli("export", "checkpoint=3")
    assert result.returncode == 2 and "`export` needs run=..." in result.stderr


# ---- publish ------------------------------------------------------------------------------------

def test_publish_uploads_the_adapter_and_its_card_in_one_commit(demo_run, cli):
    with HubStandIn(tokens={TOKEN: "alice"}) as hub:
        result = cli("publish", f"run={demo_run}", "hub.repo_id=alice/tiny-demo", "hub.revision=exp-1",
                         "model.hub_id=demo-org/tiny-llama", env=hub_env(hub))
    assert result.returncode == 0, result.stderr[-2000:]
    repo = hub.repos["alice/tiny-demo"]
    assert repo["visibility"] == "private" and repo["branches"] == ["main", "exp-1"]
    assert len(repo["commits"]) == 1
    commit = repo["commits"][0]
    assert commit["branch"] == "exp-1" and commit["message"] == "finetune: tiny_qlora adapter"
    local = {p.name: p.read_bytes() for p in (demo_run / "adapter").iterdir()}
    assert set(commit["files"]) == set(local)
    assert commit["files"]["adapter_model.safetensors"] == local["adapter_model.safetensors"]  # via LFS
    assert json.loads(commit["files"]["adapter_config.json"])["base_model_name_or_path"] == "demo-org/tiny-llama"
    from huggingface_hub import ModelCard

    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == "demo-org/tiny-llama" and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"  # from the base model's own card
    assert card.data.pipeline_tag == "text-generation" and {"qlora", "finetune"} <= set(card.data.tags)
    s = summary_of(demo_run)
    assert f"{s['eval_loss_base']:.4g}" in card.text and f"{s['eval_loss']:.4g}" in card.text
    assert "r=32, alpha=64" in card.text and "## Merge fidelity" in card.text and s["wandb_run"] in card.text
    assert "/tmp" not in str(card) and str(demo_run) not in str(card)  # no local paths
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, p, h in hub.requests if p.startswith("/api/repos"))


def test_publish_the_merged_model_publicly(demo_run, cli):
    with HubStandIn(tokens={TOKEN: "alice"}) as hub:
        result = cli("publish", f"run={demo_run}", "hub.repo_id=alice/tiny-merged", "hub.model=merged",
                         "hub.private=false", env=hub_env(hub))
    assert result.returncode == 0, result.stderr[-2000:]
    repo = hub.repos["alice/tiny-merged"]
    files = repo["commits"][0]["files"]
    assert repo["visibility"] == "public" and {"model.safetensors", "config.json", "generation_config.json"} <= set(files)
    assert b"library_name: transformers" in files["README.md"]


@pytest.mark.parametrize("case", ["no token", "bad token", "no permission", "no network", "commit refused"])
def test_publish_failures_are_one_message_and_leave_nothing(demo_run, cli, case):
    with HubStandIn(tokens={TOKEN: "alice"}, fail_commit_with=500 if case == "commit refused" else None) as hub:
        env = hub_env(hub, token={"no token": None, "bad token": "hf_wrong"}.get(case, TOKEN))
        if case == "no network":
            env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: connection refused
        repo_id = "bob/x" if case == "no permission" else "alice/x"
        result = cli("publish", f"run={demo_run}", f"hub.repo_id={repo_id}", env=env)
    expected = {
        "no token": "Publishing needs a Hugging Face token with write access: set HF_TOKEN",
        "bad token": "The Hugging Face Hub rejected the token",
        "no permission": "The token may not write to bob/x",
        "no network": "Could not reach the Hugging Face Hub",
        "commit refused": "The Hugging Face Hub refused the upload to alice/x (HTTP 500",
    }[case]
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and TOKEN not in result.stderr + result.stdout
    assert hub.repos == {}  # a repository created for the failed commit is deleted again


def test_train_with_hub_push_publishes_and_never_writes_the_token(tiny_args, cli, tmp_path):
    out = tmp_path / "run"
    with HubStandIn(tokens={TOKEN: "alice"}) as hub:
        result = cli(*tiny_args(out, "tracking=wandb", "tracking.log_model=true", "hub=push", "hub.repo_id=alice/pushed"),
                     env=hub_env(hub))
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(out)["hub_commit_url"].startswith(f"{hub.url}/alice/pushed/commit/")
    assert set(hub.repos["alice/pushed"]["commits"][0]["files"]) >= {"adapter_model.safetensors", "README.md"}
    # the token is nowhere: not in any file of the run (config.yaml, summary, W&B's offline log), nor in the output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20 and not [p for p in files if TOKEN.encode() in p.read_bytes()]
    assert TOKEN not in result.stdout + result.stderr
    assert "lora.r=8 is not one of vLLM's ranks" not in result.stderr  # 8 is one


def test_hub_push_without_a_token_fails_before_training(tiny_args, cli, tmp_path):
    out = tmp_path / "run"
    result = cli(*tiny_args(out, "hub=push", "hub.repo_id=alice/pushed"), env={"HF_HUB_OFFLINE": None})
    assert result.returncode == 2 and "Publishing needs a Hugging Face token" in result.stderr
    assert not out.exists()  # nothing trained, nothing written


# ---- W&B ----------------------------------------------------------------------------------------

def test_the_adapter_is_logged_as_a_wandb_model_artifact(demo_run):
    (log,) = list((demo_run / "wandb").glob("offline-run-*/run-*.wandb"))
    artifacts = [r.artifact for r in read_wandb_log(log) if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.type == "model"]
    assert artifact.name.endswith("-adapter") and "latest" in artifact.aliases
    files = {entry.path for entry in artifact.manifest.contents}
    assert files == {p.name for p in (demo_run / "adapter").iterdir()}


# ---- nothing lost -------------------------------------------------------------------------------

@pytest.fixture
def run_copy(demo_run, tmp_path):
    """A copy of the demo run that a test may export into."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb", "exports"))
    return copy


def test_a_rejected_re_merge_keeps_the_merged_model_there(run_copy, cli):
    before = (run_copy / "merged" / "model.safetensors").read_bytes()
    result = cli("export", f"run={run_copy}", "export.max_kl=1e-12")
    assert result.returncode == 2 and "The merged/ already there, from an earlier export, is kept." in result.stderr
    assert (run_copy / "merged" / "model.safetensors").read_bytes() == before
    assert not list(run_copy.glob(".merged.*"))  # no staging left behind


def test_an_interrupted_export_changes_nothing(run_copy, cli, monkeypatch):
    """Ctrl-C in the middle of a merge: adapter/, merged/ and summary.json are as they were."""
    import finetune.export as export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    files = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    monkeypatch.setattr(export, "build_merged", interrupted)
    assert cli("export", f"run={run_copy}", "export.merge=true").returncode == 130
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == files


def test_export_keeps_the_adapter_weights_as_trained(run_copy, cli):
    before = (run_copy / "adapter" / "adapter_model.safetensors").read_bytes()
    assert cli("export", f"run={run_copy}").returncode == 0
    assert (run_copy / "adapter" / "adapter_model.safetensors").read_bytes() == before  # bf16, not re-saved as fp32


def test_publish_checks_every_file_before_creating_anything(run_copy, cli):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with HubStandIn(tokens={TOKEN: "alice"}) as hub:
        result = cli("publish", f"run={run_copy}", "hub.repo_id=alice/x", env=hub_env(hub))
    assert result.returncode == 2 and "adapter_model.safetensors is unreadable" in result.stderr
    assert "Nothing was uploaded" in result.stderr and hub.repos == {} and not hub.requests


# ---- prune --------------------------------------------------------------------------------------

def test_prune_drops_the_least_influential_layers_into_a_model_plain_transformers_loads_and_compare_measures(
        demo_run, cli, tmp_path):
    """Block influence ranks the demo's 4 layers; the 2 lowest go, the others keep their weights, and the result is a
    plain 2-layer Llama with its own config, measured before and after, planned, and compared with the run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    result = cli("prune", f"run={demo_run}", "prune.layers=2", f"prune.output_dir={out}", "eval.exact_match_samples=8",
                 "data.eval_max_samples=8", "plan.gpu=rtx3060")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "prune.json").read_text())
    scores, dropped = report["scores"], report["dropped"]
    assert len(scores) == 4 and sorted(dropped) == sorted(sorted(range(4), key=scores.__getitem__)[:2])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == len(model.model.layers) == 2 == report["layers_after"]
    kept = [i for i in range(4) if i not in dropped]
    source = load_file(str(demo_run / "merged" / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    for new, old in enumerate(kept):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(pruned[name.format(new)], source[name.format(old)])
    assert report["params_after"] < report["params_before"] and report["after"]["eval_loss"] > 0
    assert set(report["before"]) == set(report["after"]) == {"eval_loss", "exact_match"}
    # plan's figures of both: the parameters as built, and the smaller model faster to train and to decode
    planned = report["plan"]
    assert (planned["before"]["params"], planned["after"]["params"]) == (report["params_before"], report["params_after"])
    assert planned["train_speedup"] > 1.2 and planned["decode_speedup"] > 1.2
    assert planned["after"]["train_peak_gib"] < planned["before"]["train_peak_gib"]

    # `eval compare=`: the run and its pruned model on the same rows, with the GPU-hours that made each
    compared = cli("eval", f"run={demo_run}", f"compare={out}", "plan.gpu=rtx3060", "data.eval_max_samples=8")
    assert compared.returncode == 0, compared.stderr[-2000:]
    original, smaller = json.loads((demo_run / "compare" / "eval.json").read_text())["rows"]
    assert (original["kind"], smaller["kind"], original["agreement_original"]) == ("original", "pruned", 1)
    assert smaller["loss"] == pytest.approx(report["after"]["eval_loss"], rel=1e-4)  # what prune measured
    assert smaller["weights_gb"] < original["weights_gb"] and smaller["agreement_original"] < 1
    assert 0 < smaller["gpu_hours"] < original["gpu_hours"] == original["gpu_hours_total"]
    assert smaller["gpu_hours_total"] == pytest.approx(smaller["gpu_hours"] + original["gpu_hours"])
    assert "GPU-hours on the NVIDIA GeForce RTX 3060" in compared.stdout and "pruned: pruned" in compared.stdout
    for args, said in ((["compare=/nowhere"], "neither a run directory"),
                       ([f"compare={out}", "eval.quant=[nf4,none]"], "every model is measured at one precision"),
                       ([f"compare={out}", "eval.harness_tasks=[hellaswag]"], "lm-eval runs on one model at a time")):
        refused = cli("eval", f"run={demo_run}", *args)
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_a_base_is_compared_with_the_model_pruned_from_it(cli, tmp_path):
    """prune recipe=NAME on the embedded base, then eval recipe=NAME compare=...: both measured as prune measured them,
    and the GPU-hours are the pruning's alone (nobody here made the base)."""
    small = ["data.eval_max_samples=8", "eval.exact_match_samples=8", "eval.max_new_tokens=8", "plan.gpu=l4"]
    out = tmp_path / "pruned"
    result = cli("prune", "recipe=tiny_qlora", "prune.layers=1", "prune.samples=8", f"prune.output_dir={out}",
                 f"output_dir={tmp_path / 'base'}", *small)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "prune.json").read_text())
    compared = cli("eval", "recipe=tiny_qlora", f"compare={out}", f"output_dir={tmp_path / 'cmp'}", *small)
    assert compared.returncode == 0, compared.stderr[-2000:]
    base, smaller = json.loads((tmp_path / "cmp" / "compare" / "eval.json").read_text())["rows"]
    assert (base["kind"], smaller["kind"]) == ("base", "pruned") and "gpu_hours" not in base
    assert base["loss"] == pytest.approx(report["before"]["eval_loss"], rel=1e-4)
    assert smaller["loss"] == pytest.approx(report["after"]["eval_loss"], rel=1e-4)
    assert smaller["gpu_hours"] == smaller["gpu_hours_total"] > 0 and smaller["weights_gb"] < base["weights_gb"]


@pytest.mark.parametrize("args, message", [
    (["prune.layers=4"], "prune.layers=4 would drop 4 of the model's 4 decoder layers: at least one must stay"),
    ([], "`prune` needs one of prune.layers=N"),
    (["prune.layers=1", "prune.target_params=1000"], "`prune` needs one of prune.layers=N"),
    (["prune.layers=0"], "prune.layers=0 is out of range"),
])
def test_prune_user_errors(demo_run, cli, tmp_path, args, message):
    result = cli("prune", f"run={demo_run}", f"prune.output_dir={tmp_path / 'p'}", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "p").exists()
