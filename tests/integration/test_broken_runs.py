"""A damaged run directory (a copy cut short, a disk error, a hand edit) is one message from every verb that reads
it, naming the file, before anything is loaded, uploaded or written."""

import json
import shutil

import pytest

WEIGHTS, CONFIG = "adapter/adapter_model.safetensors", "adapter/adapter_config.json"


def cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # name -> (what is done to the run, what the message says)
    "weights cut short": (lambda d: cut(d / WEIGHTS), "adapter_model.safetensors is unreadable"),
    "weights garbage": (lambda d: (d / WEIGHTS).write_bytes(b"garbage" * 100), "adapter_model.safetensors is unreadable"),
    "weights empty": (lambda d: (d / WEIGHTS).write_bytes(b""), "adapter_model.safetensors is unreadable"),
    "weights gone": (lambda d: (d / WEIGHTS).unlink(), "adapter_config.json is there but adapter_model.safetensors is not"),
    "adapter config garbage": (lambda d: (d / CONFIG).write_text("{not json"), "adapter_config.json is not valid JSON"),
    "adapter config a list": (lambda d: (d / CONFIG).write_text("[1, 2]"), "adapter_config.json does not hold an object"),
    "adapter config wrong type": (lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "r": "sixteen"})), "holds them with wrong types"),
    "tokenizer garbage": (lambda d: (d / "adapter" / "tokenizer.json").write_text("{bad"), "tokenizer.json is not valid JSON"),
    "config.yaml bad YAML": (lambda d: (d / "config.yaml").write_text("model: [unclosed\n"), "does not fit this version"),
    "config.yaml empty": (lambda d: (d / "config.yaml").write_text(""), "config.yaml is incomplete"),
}
VERBS = {
    "generate": ["prompt=Write 5 in words.", "max_new_tokens=4"],
    "eval": ["data.eval_max_samples=2", "eval.max_new_tokens=2"],
    "export": [],
    "publish": ["hub.repo_id=org/name"],
}


@pytest.fixture(scope="module")
def damaged(demo_run, tmp_path_factory):
    """A copy of the demo run per kind of damage."""
    runs = {}
    for name, (damage, _) in DAMAGE.items():
        run = tmp_path_factory.mktemp("damaged") / "run"
        shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "exports", "merged"))
        damage(run)
        runs[name] = run
    return runs


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("name", DAMAGE)
def test_every_verb_names_the_damage(damaged, cli, name, verb):
    run = damaged[name]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = cli(verb, f"run={run}", *VERBS[verb], env={"HF_TOKEN": None})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("error:") == 1 and DAMAGE[name][1] in result.stderr, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_bad_summary_is_said_and_rewritten(damaged, demo_run, cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "exports", "merged"))
    (run / "summary.json").write_text("{garbage")
    result = cli("export", f"run={run}", "export.merge=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "summary.json cannot be read" in result.stderr and "its figures are rewritten" in result.stderr
    assert isinstance(json.loads((run / "summary.json").read_text()), dict)
