"""The worker configuration: sources in order, types, and clear errors."""

from __future__ import annotations

import pytest

from worker.__main__ import main
from worker.config import (
    ConfigError,
    DeliveryMode,
    GapPolicy,
    WorkerConfig,
    build_parser,
    load_config,
    to_flags,
)


def test_defaults_are_valid_and_documented() -> None:
    config = load_config(environ={})
    assert config == WorkerConfig()
    assert config.delivery is DeliveryMode.EXACTLY_ONCE
    assert config.gap_policy is GapPolicy.FILL_SILENCE
    assert config.engine.att_context_size == (70, 13)
    assert config.engine.cache_gating is True


def test_file_then_environment_then_flags(tmp_path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(
        'input_topic = "from-file"\nidle_timeout_sec = 5\nmax_speakers = 2\n'
        'output_topic = "out-file"\n'
    )
    env = {"CALLSCRIBE_IDLE_TIMEOUT_SEC": "7", "CALLSCRIBE_OUTPUT_TOPIC": "out-env"}
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--output-topic",
            "out-flag",
            "--att-context-size",
            "70,6",
            "--cache-gating",
            "false",
        ]
    )
    config = load_config(args, environ=env)
    assert config.input_topic == "from-file"
    assert config.idle_timeout_sec == 7.0
    assert config.output_topic == "out-flag"
    assert config.engine.max_speakers == 2
    assert config.engine.att_context_size == (70, 6)
    assert config.engine.cache_gating is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"idle_timeout_sec": "0"}, "idle_timeout_sec must be positive"),
        ({"delivery": "maybe"}, "one of: exactly_once, at_least_once"),
        ({"max_streams": "lots"}, "max_streams"),
        ({"output_topic": "call-audio"}, "distinct"),
        ({"max_speakers": "9"}, "max_speakers"),
        ({"float64": "perhaps"}, "not a boolean"),
        ({"metrics_port": "70000"}, "metrics_port"),
    ],
)
def test_bad_values_name_the_setting(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides=overrides)


def test_unknown_file_keys_are_rejected(tmp_path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("idle_timeout = 5\n")
    with pytest.raises(ConfigError, match=r"unknown settings.*idle_timeout"):
        load_config(environ={"CALLSCRIBE_CONFIG": str(path)})


def test_help_lists_every_setting(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--bootstrap-servers",
        "--delivery",
        "--gap-policy",
        "--max-streams",
        "--att-context-size",
        "--max-streams-per-step",
        "CALLSCRIBE_IDLE_TIMEOUT_SEC",
    ):
        assert flag in text


def test_run_with_a_bad_setting_exits_2(capsys) -> None:
    assert main(["run", "--idle-timeout-sec", "-1"]) == 2
    assert "idle_timeout_sec must be positive" in capsys.readouterr().err


def test_flags_reproduce_the_connection_settings() -> None:
    config = load_config(environ={}, overrides={"input_topic": "in-x", "group_id": "g-x"})
    again = load_config(build_parser().parse_args(to_flags(config)), environ={})
    assert again == config
    assert to_flags(config)[:2] == ["--bootstrap-servers", config.bootstrap_servers]


@pytest.mark.parametrize(
    ("overrides", "dtype"),
    [
        ({"float64": "true"}, "fp64"),
        ({"dtype": "fp64"}, "fp64"),
        ({"float64": "true", "dtype": "fp64"}, "fp64"),
        ({"dtype": "bf16"}, "bf16"),
        ({}, "fp32"),
    ],
)
def test_float64_and_dtype_fp64_are_one_setting(overrides, dtype) -> None:
    config = load_config(environ={}, overrides=overrides)
    assert config.engine.dtype == dtype
    assert config.float64 is (dtype == "fp64")


def test_float64_with_bf16_is_refused() -> None:
    with pytest.raises(ConfigError, match="float64 contradicts dtype bf16"):
        load_config(environ={}, overrides={"float64": "true", "dtype": "bf16"})
