"""Every schema key, given any value a careless user could type: a config, or one UserError. Never another
exception, never a non-finite number or an impossible seed accepted. Through both ways a user sets a key:
the training command line (Hydra composes it: a quarter of a second each) and a finished run's overrides
(`export run=... key=value`: the run's config.yaml read back)."""

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config import schema_keys
from finetune.errors import UserError
from finetune.registry import load_config

KEYS = sorted(schema_keys())
# the slow tier's runs; FUZZ_SCALE=10 python -m pytest tests/unit/test_config_fuzz.py fuzzes ten times as long
AT_LENGTH = float(os.environ.get("FUZZ_SCALE", "1"))
VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "null", "[]", "[a,b]", "{}", "", "true", "''", "${now:%Y}", "[1,2,3]",
                     "-0.0", "1e-320", "\u00e9\u4e2d\U0001f600", "x" * 5000, "4294967296", "-1"]),
)


def accepted(cfg) -> None:
    """What was accepted is finite and in range."""
    for k in KEYS:
        v = cfg
        for part in k.split("."):
            v = getattr(v, part)
        assert not (isinstance(v, float) and not math.isfinite(v)), (k, v)
    assert 0 <= cfg.train.seed < 2**32


def on_the_command_line(key: str, value: str, tmp_path) -> None:
    try:
        accepted(load_config([f"{key}={value}", f"output_dir={tmp_path / 'run'}"]))
    except UserError as e:
        assert str(e).strip()
    assert not (tmp_path / "run").exists()  # validation writes nothing


def on_a_run(key: str, value: str, config) -> None:
    from finetune.run import read_config

    try:
        accepted(read_config(config, [f"{key}={value}"], "RUN"))
    except UserError as e:
        assert str(e).strip()


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    from finetune.registry import to_yaml

    path = tmp_path_factory.mktemp("run") / "config.yaml"
    path.write_text(to_yaml(load_config([])))
    return path


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_on_the_command_line_is_a_config_or_one_message(tmp_path_factory, key, value):
    on_the_command_line(key, value, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_on_a_run_is_a_config_or_one_message(run_config, key, value):
    on_a_run(key, value, run_config)


@pytest.mark.slow
@settings(max_examples=int(10 * AT_LENGTH), deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_on_the_command_line_at_length(tmp_path_factory, key, value):
    on_the_command_line(key, value, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.slow
@settings(max_examples=int(120 * AT_LENGTH), deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_on_a_run_at_length(run_config, key, value):
    on_a_run(key, value, run_config)
