"""DPO runs end to end: the loss starts at log 2, the reference is the model the run started from, the preference
moves, the figures reach metrics.jsonl, W&B and `eval`, resume is exact, and the adapter loads in plain PEFT.

The shared run is the preference demo (recipes/dpo_tiny.yaml) shortened, in this process: from the shipped SFT
demo run, pure DPO (train.sft_weight=0), a checkpoint every 2 steps."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, free_port, read_wandb_log, run_cli, wandb_history
from tests.integration.test_distributed import LOSS_TOLERANCE

pytestmark = pytest.mark.slow
STEPS = 4
RUN = ["recipe=dpo_tiny", f"train.max_steps={STEPS}", "train.save_steps=2", "train.save_total_limit=5",
       "train.sft_weight=0", "train.learning_rate=2e-3", "train.logging_steps=1", "data.eval_max_samples=12",
       "eval.exact_match_samples=6", "export=adapter"]


def records(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def captured_run(cli, monkeypatch, *args) -> dict:
    """A run through the CLI in this process, its trainer kept, and as training ends (before export lets the
    reference go) TRL's reference log-probabilities of the first eval pairs and the policy's."""
    from transformers import TrainerCallback

    import finetune.pipeline as pipeline

    captured, real = {}, pipeline.build_trainer

    class AtTheEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            trainer = captured["trainer"]
            if hasattr(trainer, "compute_ref_log_probs"):  # DPO's
                captured["reference"] = trainer.compute_ref_log_probs(trainer.model, eval_batch(trainer))
                captured["policy"] = logps_of(trainer.model, trainer)

    def build_and_capture(*a, **k):
        captured["trainer"] = real(*a, **k)
        captured["trainer"].add_callback(AtTheEnd())
        return captured["trainer"]

    monkeypatch.setattr(pipeline, "build_trainer", build_and_capture)
    result = cli(*args)
    monkeypatch.undo()
    assert result.returncode == 0, result.stderr[-3000:]
    return captured | {"stdout": result.stdout}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from _pytest.monkeypatch import MonkeyPatch

    from tests.helpers import run_main

    out = tmp_path_factory.mktemp("dpo") / "run"
    with MonkeyPatch.context() as monkeypatch:
        captured = captured_run(run_main, monkeypatch, *RUN, "export=merged", f"output_dir={out}")
    return captured | {"dir": out, "summary": json.loads((out / "summary.json").read_text())}


def eval_batch(trainer, n: int = 8):
    return trainer.data_collator([trainer.eval_dataset[i] for i in range(n)])


def logps_of(model, trainer, n: int = 8) -> tuple:
    """Summed log-probabilities of the first n eval pairs' chosen and rejected answers under `model`."""
    from finetune.scoring import pair_logps

    return pair_logps(model, trainer.eval_dataset.select(range(n)), trainer.processing_class.pad_token_id, 8)


def test_dpo_starts_at_log_2_and_moves_the_models_own_preference(dpo_run):
    """The reference equals the policy at step 0, so every pair's loss is -log sigmoid(0) = log 2; four steps
    later the model prefers the chosen answers by a wider margin (no fewer of them); TRL's figures reach metrics.jsonl."""
    s, logged = dpo_run["summary"], records(dpo_run["dir"])
    assert s["objective"] == "dpo" and s["beta"] == 0.1 and s["data_format"] == "preference_chat"
    assert s["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6)
    first = next(r for r in logged if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5) and first["rewards/accuracies"] == 0
    assert s["eval_loss"] < math.log(2) - 0.05
    assert s["preference_accuracy"] >= s["preference_accuracy_base"] and s["preference_margin"] > s["preference_margin_base"] + 1
    trained = [r for r in logged if "loss" in r]
    assert len(trained) == STEPS and all({"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}
                                         <= set(r) for r in trained)
    assert trained[-1]["rewards/margins"] > 0
    measured = [r for r in logged if "preference_accuracy" in r]
    assert [r["step"] for r in measured] == [0, STEPS] and measured[-1]["preference_accuracy"] == s["preference_accuracy"]
    assert "preference_accuracy" in dpo_run["stdout"]


def test_the_figures_reach_wandb(dpo_run):
    (log,) = (dpo_run["dir"] / "wandb").glob("offline-run-*/run-*.wandb")
    logged = read_wandb_log(log)
    assert len(wandb_history(logged, "train/rewards/margins")) == STEPS
    assert wandb_history(logged, "eval/preference_accuracy") == [dpo_run["summary"]["preference_accuracy_base"],
                                                                 dpo_run["summary"]["preference_accuracy"]]


def test_the_reference_is_the_adapter_the_run_started_from_with_no_second_model(dpo_run):
    """TRL's reference forward (a frozen copy of init_from's adapter, in the same weights) gives the log-probabilities
    of that adapter loaded on its own base (to bf16 rounding); the trained policy's are far from them."""
    from finetune.run import Run

    trainer, reference = dpo_run["trainer"], dpo_run["reference"]
    assert trainer.ref_model is None
    start = Run.open(str(dpo_run["dir"])).cfg.init_from
    chosen, rejected = logps_of(Run.open(start).load_for_inference().model, trainer)
    # the same adapter, computed in bf16 in training (TRL's cast for a quantized base) and in fp32 here
    assert torch.allclose(reference[0], torch.tensor(chosen), rtol=2e-3, atol=1e-3)
    assert torch.allclose(reference[1], torch.tensor(rejected), rtol=2e-3, atol=1e-3)
    assert max(abs(a - b) for a, b in zip(dpo_run["policy"][0], chosen)) > 0.1


def test_a_new_adapters_reference_is_the_base_itself(tmp_path, cli, monkeypatch):
    """Without init_from, DPO trains a new adapter and the reference is the model with it off: the base's own
    log-probabilities. The loss starts at log 2 there too."""
    from finetune.model import detect_device, load_base_model
    from finetune.registry import load_config

    run = captured_run(cli, monkeypatch, *RUN[:1], "init_from=null", "train.max_steps=2", "train.sft_weight=0",
                       "train.learning_rate=5e-3", "data.eval_max_samples=8", "eval.exact_match_samples=0",
                       "export=adapter", "tracking=none", f"output_dir={tmp_path / 'run'}")
    trainer, reference = run["trainer"], run["reference"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6) and summary["init_from"] is None
    cfg = load_config(["recipe=dpo_tiny"])
    base = load_base_model(cfg.model, cfg.quant, detect_device(cfg.train, cfg.quant, cfg.model)).eval()
    chosen, rejected = logps_of(base, trainer)
    assert torch.allclose(reference[0], torch.tensor(chosen), atol=1e-3)
    assert torch.allclose(reference[1], torch.tensor(rejected), atol=1e-3)
    assert max(abs(a - b) for a, b in zip(run["policy"][0], chosen)) > 1e-3  # it trained


def test_the_adapter_is_the_trained_one_alone_and_loads_in_plain_peft(dpo_run):
    """adapter/ holds the trained adapter, not TRL's reference copy, and plain PEFT puts it on the base; merged/ was
    checked against the 4-bit model as trained (on the eval pairs' chosen sides) and loads in plain transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.run import Run

    adapter = dpo_run["dir"] / "adapter"
    assert not (adapter / "ref").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and not any(".ref." in k for k in weights)
    base = AutoModelForCausalLM.from_pretrained(Run.open(str(dpo_run["dir"])).cfg.model.name_or_path)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert model.peft_config["default"].r == 32
    card = (adapter / "README.md").read_text()  # what `publish` uploads: the objective and the pairs it learned from
    assert "- dpo\n" in card and "| objective | DPO on preference pairs (preference_chat: prompt, chosen and " in card
    assert "continued from the adapter of demo_sft_run |" in card and "| preference accuracy, tuned |" in card
    summary = dpo_run["summary"]
    assert summary["merge_fidelity"]["samples"] == 4 and summary["merge_mean_kl"] < 0.01
    merged = AutoModelForCausalLM.from_pretrained(dpo_run["dir"] / "merged")
    assert merged.config.num_hidden_layers == base.config.num_hidden_layers


def test_eval_reports_the_preference_of_the_base_the_start_and_the_tuned_adapter(dpo_run, cli):
    result = cli("eval", f"run={dpo_run['dir']}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((dpo_run["dir"] / "eval.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base, nf4", "init_from, nf4", "nf4"]
    base, start, tuned = rows
    assert all(r["pairs"] == 12 for r in rows) and start["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["preference_margin"] > start["preference_margin"] + 1 > base["preference_margin"] + 1
    assert tuned["preference_accuracy"] == dpo_run["summary"]["preference_accuracy"]
    assert tuned["preference_margin"] == pytest.approx(dpo_run["summary"]["preference_margin"], rel=0.01)
    assert "prefers" in result.stdout


def test_two_processes_train_as_one_at_the_same_effective_batch(dpo_run, tmp_path):
    """The shared run (one process, 16 pairs a step) again under `accelerate launch` with two DDP processes of 8
    pairs each, the pairs and the reference pass split between them: the same losses within LOSS_TOLERANCE, and
    the model's own preference measured once."""
    two = tmp_path / "two"
    result = run_cli(*RUN, "train.micro_batch_size=8", "tracking=none", f"output_dir={two}", launch=(
        "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port())))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [{r["step"]: r["loss"] for r in records(run) if "loss" in r} for run in (two, dpo_run["dir"])]
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, STEPS + 1))
    assert max(abs(losses[0][s] - losses[1][s]) for s in losses[1]) < LOSS_TOLERANCE, losses
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["processes"], summary["effective_batch"]) == (2, dpo_run["summary"]["effective_batch"])
    assert [r["step"] for r in records(two) if "preference_accuracy" in r] == [0, STEPS]
    assert summary["preference_margin"] == pytest.approx(dpo_run["summary"]["preference_margin"], rel=0.05)


def test_orpo_scores_only_the_answers_and_resumes_exactly(cli, monkeypatch, tmp_path):
    """ORPO: the chosen answers' cross-entropy plus the odds-ratio term, from the shipped SFT demo run, no reference.
    Its cross-entropy covers the chosen answers alone (TRL's own also covers the prompt); TRL's figures and our
    token count reach metrics.jsonl; resumed from its checkpoint-2, every loss and the adapter bit for bit."""
    import torch.nn.functional as F

    orpo = ["recipe=orpo_tiny", f"train.max_steps={STEPS}", "train.save_steps=2", "train.logging_steps=1",
            "data.eval_max_samples=8", "eval.exact_match_samples=0", "export=adapter", "tracking=none"]
    out, resumed = tmp_path / "orpo", tmp_path / "resumed"
    trainer = captured_run(cli, monkeypatch, *orpo, f"output_dir={out}")["trainer"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        nll = trainer.concatenated_forward(trainer.model, batch)[4]
        answers = []
        for ids, labels in zip(batch["chosen_input_ids"], batch["chosen_labels"]):
            logits = trainer.model(input_ids=ids[None]).logits[0, :-1].float()
            answers.append(F.cross_entropy(logits, labels[1:], reduction="none")[labels[1:] != -100])
    assert nll.item() == pytest.approx(torch.cat(answers).mean().item(), rel=1e-4)
    s, logged = json.loads((out / "summary.json").read_text()), records(out)
    trained = [r for r in logged if "loss" in r]
    assert s["objective"] == "orpo" and getattr(trainer, "ref_model", None) is None
    assert "| objective | ORPO on preference pairs (preference_chat: prompt, chosen and rejected answers), the " \
        "chosen answers' cross-entropy plus lambda=0.1 x the odds-ratio term;" in (out / "adapter" / "README.md").read_text()
    assert trained[-1]["loss"] < trained[0]["loss"] and all({"nll_loss", "log_odds_ratio"} <= set(r) for r in trained)
    assert s["train_tokens"] == trained[-1]["num_tokens"] > 0 and s["tokens_per_second"] > 0
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"checkpoint-{STEPS}")
    shutil.rmtree(resumed / "adapter")
    result = cli(*orpo, f"output_dir={resumed}", "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [{r["step"]: r["loss"] for r in records(d) if "loss" in r} for d in (resumed, out)]
    assert losses[0] == losses[1]
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (resumed, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "summary.json").read_text())["train_tokens"] == s["train_tokens"]


def test_a_full_fine_tune_computes_its_reference_before_training_without_a_second_model(cli, monkeypatch, tmp_path):
    """lora=off: the model's own log-probabilities of every pair, computed before its first step, are the reference
    (TRL's precompute_ref_log_probs): no second model is loaded, and step 0 is log 2."""
    run = captured_run(cli, monkeypatch, "recipe=dpo_tiny", "init_from=null", "lora=off", "quant=none",
                       "train.optim=adamw_torch", "train.max_steps=2", "train.learning_rate=1e-4",
                       "train.sft_weight=0", "data.eval_max_samples=8", "eval.exact_match_samples=0", "export=adapter",
                       "tracking=none", f"output_dir={tmp_path / 'run'}")
    trainer = run["trainer"]
    assert trainer.ref_model is None and trainer.args.precompute_ref_log_probs
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6) and summary["eval_loss"] < math.log(2)
    assert summary["trainable_params"] == summary["total_params"] and (tmp_path / "run" / "model").is_dir()



def test_sigterm_stops_dpo_at_a_checkpoint_and_resume_is_exact(dpo_run, cli, monkeypatch, tmp_path):
    """The shared run again, a SIGTERM during step 3: checkpoint-3 written, exit 75; resume=true then gives every
    loss and the adapter of the uninterrupted run bit for bit, and the base's figures measured once."""
    import os
    import signal

    from transformers import TrainerCallback

    import finetune.pipeline as pipeline

    class SigtermDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    run, real = tmp_path / "run", pipeline.build_trainer
    monkeypatch.setattr(pipeline, "build_trainer", lambda *a, **k: real(*a[:-1], [*a[-1], SigtermDuringStep3()], **k))
    stopped = cli(*RUN, f"output_dir={run}")
    monkeypatch.undo()
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert (run / "checkpoints" / "checkpoint-3").is_dir() and not (run / "adapter").exists()
    result = cli(*RUN, f"output_dir={run}", "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [{r["step"]: r["loss"] for r in records(d) if "loss" in r} for d in (run, dpo_run["dir"])]
    assert losses[0] == losses[1]
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run, dpo_run["dir"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["preference_accuracy_base"] == dpo_run["summary"]["preference_accuracy_base"]
    assert [r["step"] for r in records(run) if "preference_accuracy" in r] == [0, STEPS]


def test_a_non_finite_dpo_loss_stops_at_the_last_good_checkpoint(cli, monkeypatch, tmp_path):
    """The NaN guard on DPO as on SFT: the loss made NaN at step 3 stops the run, naming the step and the checkpoint
    it keeps."""
    import finetune.pipeline as pipeline

    real, calls = pipeline.build_trainer, []

    def poisoned(*a, **k):
        trainer = real(*a, **k)
        loss = trainer.compute_loss

        def nan_at_step_3(model, inputs, *args, **kwargs):
            out = loss(model, inputs, *args, **kwargs)
            calls.append(model.training)
            return out * float("nan") if model.training and calls.count(True) == 3 else out

        trainer.compute_loss = nan_at_step_3
        return trainer

    monkeypatch.setattr(pipeline, "build_trainer", poisoned)
    result = cli(*RUN, "train.max_bad_steps=0", "tracking=none", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Non-finite loss or gradient at step 3" in result.stderr and "checkpoint-2, is kept" in result.stderr
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
