"""The command line: messages, exit codes, and no files left behind by Hydra. The real console command runs in
a subprocess once; the other cases call the same main() in this process."""

import yaml

from tests.helpers import run_cli


def assert_user_error(result, *parts):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in result.stderr


def test_unknown_key_exits_2_with_the_closest_match(tmp_path):
    """In a subprocess: the exit code the shell sees, and nothing written where it ran."""
    assert_user_error(run_cli("train.lerning_rate=1e-4", cwd=tmp_path), "Did you mean 'train.learning_rate'?")
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe_and_verb(cli, tmp_path):
    assert_user_error(cli("recipe=qlora_llama_7b", cwd=tmp_path), "Unknown recipe", "Did you mean 'qlora_llama7b'?")
    assert_user_error(cli("trian", cwd=tmp_path), "Unknown verb 'trian'", "Did you mean 'train'?")


def test_cfg_job_prints_the_composed_config_and_writes_nothing(cli, tmp_path):
    result = cli("recipe=qlora_llama7b", "lora.r=8", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert cfg["lora"]["r"] == 8 and cfg["recipe"] == "qlora_llama7b"
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log files


def test_an_option_that_is_not_a_key_is_refused(cli, tmp_path):
    assert_user_error(cli("--resolve", cwd=tmp_path), "Unknown option --resolve", "--cfg job")
    assert_user_error(cli("--cfg", "job", "--verbose", cwd=tmp_path), "Unknown option --verbose")


def test_help_lists_recipes_groups_and_keys(cli):
    result = cli("--help")
    assert result.returncode == 0
    for part in ("qlora_llama7b", "tiny_qlora", "quant", "nf4, none", "train.learning_rate", "paged_adamw_8bit"):
        assert part in result.stdout


def test_an_existing_run_is_never_overwritten(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("precious")
    assert_user_error(cli(f"output_dir={run}", cwd=tmp_path), "already holds a run", "resume=true", "overwrite=true")
    assert (run / "summary.json").read_text() == "precious"
    assert_user_error(cli(f"output_dir={run}", "resume=true", cwd=tmp_path), "holds no checkpoint to resume from")
    assert (run / "summary.json").read_text() == "precious"


def test_a_missing_model_path_exits_2_and_leaves_no_run_behind(cli, tmp_path):
    assert_user_error(cli(f"output_dir={tmp_path / 'r'}", f"model.name_or_path={tmp_path / 'nope'}", cwd=tmp_path),
                      "model.name_or_path=", "no such folder")
    assert not (tmp_path / "r").exists()


def test_a_broken_data_row_exits_2_with_its_line(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    assert_user_error(cli(f"output_dir={tmp_path / 'r'}", f"data.path={data}", "data.eval_path=null", cwd=tmp_path),
                      f"{data}:2: invalid JSON")
