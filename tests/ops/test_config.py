"""eplb-sidecar's settings: defaults < TOML file < EPLB_* environment < flags, every option in
--help, bad values named with their source and accepted range, --print-config that reads back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eplb.config import ConfigError, render_toml
from eplb.coordinator.cli import build_parser, config_from_argv, load_settings
from eplb.coordinator.options import BY_NAME, OPTIONS, parse_http
from eplb.placement.planner import POLICIES

BASE = ["--node-rank", "0", "--num-nodes", "2", "--leader", "tcp://127.0.0.1:5555"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "eplb.toml", 'min-margin = 4\ninterval = 50\nwindow = 60\n'
                                         'policy = "deepseek"\ngroup-access = true\n')
    env = {"EPLB_CONFIG": str(conf), "EPLB_INTERVAL": "70", "EPLB_WINDOW": "80"}
    cfg = config_from_argv([*BASE, "--window", "90"], env)
    assert cfg.leader.min_margin == 4  # file
    assert cfg.leader.interval_steps == 70  # env over file
    assert cfg.leader.window_steps == 90  # flag over env over file
    assert cfg.leader.planner.policy == "deepseek" and cfg.group_access is True
    # --config names the file too, and a flag can turn a file's boolean off
    cfg = config_from_argv([*BASE, "--config", str(conf), "--no-group-access"], {})
    assert cfg.group_access is False and cfg.leader.interval_steps == 50


def test_cluster_settings_can_come_from_the_environment_alone(tmp_path: Path) -> None:
    env = {"EPLB_NODE_RANK": "1", "EPLB_NUM_NODES": "2", "EPLB_LEADER": "tcp://10.0.0.1:5555",
           "EPLB_RUN_DIR": str(tmp_path), "EPLB_HTTP": ":9000", "EPLB_EXPECTED_WORKERS": "8"}
    cfg = config_from_argv([], env)
    assert (cfg.node_rank, cfg.num_nodes, cfg.leader_address) == (1, 2, "tcp://10.0.0.1:5555")
    assert cfg.run_dir == tmp_path and cfg.http == ("0.0.0.0", 9000) and cfg.expected_workers == 8
    assert config_from_argv(BASE, {"EPLB_HTTP": "off"}).http is None


@pytest.mark.parametrize("argv, env, toml, message", [
    (["--min-gain", "1.5"], {}, "", "bad --min-gain: '1.5' is not accepted; expected a number >= 0 "
                                    "and <= 1"),
    ([], {"EPLB_MIN_MARGIN": "1"}, "", "bad --min-margin (from environment EPLB_MIN_MARGIN): '1' "
                                       "is not accepted; expected an integer >= 2"),
    ([], {}, "interval = 0\n", "key interval): '0' is not accepted; expected an integer >= 1"),
    ([], {}, 'interval = "ten"\n', "expected an integer >= 1"),
    ([], {}, "ack-timeout = 0\n", "expected a number > 0"),
    ([], {"EPLB_POLICY": "best"}, "", "expected one of " + ", ".join(POLICIES)),
    ([], {"EPLB_GROUP_ACCESS": "maybe"}, "", "expected true or false"),
    (["--http", "localhost"], {}, "", "expected HOST:PORT, :PORT (all interfaces; port 0 picks a "
                                      "free one) or off"),
    (["--bind", "0.0.0.0:5555"], {}, "", "expected tcp://HOST:PORT"),
    ([], {}, "intervall = 5\n", "unknown key 'intervall'"),
    ([], {}, "interval = [\n", "is not valid TOML"),
    (["--grace-period", "-1"], {}, "", "bad --grace-period: '-1'"),
])
def test_a_bad_value_names_the_option_its_source_and_what_is_accepted(
        tmp_path: Path, argv: list[str], env: dict, toml: str, message: str) -> None:
    if toml:
        env = {**env, "EPLB_CONFIG": str(write(tmp_path / "c.toml", toml))}
    with pytest.raises(ConfigError) as info:
        config_from_argv([*BASE, *argv], env)
    assert message in str(info.value), str(info.value)


def test_missing_and_inconsistent_cluster_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--leader is required .*EPLB_LEADER"):
        config_from_argv(["--node-rank", "0", "--num-nodes", "1"], {})
    # a rank outside --num-nodes starts, and reports the mismatch at run time (test_metrics.py)
    assert config_from_argv([*BASE, "--node-rank", "3"], {}).node_rank == 3
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_argv([*BASE, "--config", str(tmp_path / "nope.toml")], {})


def test_help_documents_every_option_with_its_environment_variable() -> None:
    text = " ".join(build_parser().format_help().split())
    for opt in OPTIONS:
        assert opt.flag in text and opt.env in text, opt.name
        assert opt.help.split()[0] in text
    assert "--print-config" in text and "EPLB_CONFIG" in text


def test_print_config_shows_sources_and_reads_back_as_the_same_config(tmp_path: Path) -> None:
    conf = write(tmp_path / "eplb.toml", "interval = 50\n")
    env = {"EPLB_CONFIG": str(conf), "EPLB_WINDOW": "80", "EPLB_RUN_DIR": str(tmp_path / "r")}
    proc = subprocess.run([sys.executable, "-m", "eplb.coordinator", *BASE, "--print-config",
                           "--min-gain", "0.25"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"interval = 50  # config file {conf}" in out
    assert "window = 80  # environment EPLB_WINDOW" in out
    assert "min-gain = 0.25  # flag --min-gain" in out
    assert "max-retries = 3  # default" in out and "# bind = (unset)" in out
    printed = write(tmp_path / "printed.toml", out)
    again = config_from_argv(["--config", str(printed)], {})
    assert again == config_from_argv([*BASE, "--min-gain", "0.25"], env)


def test_unknown_eplb_variables_are_reported_not_fatal() -> None:
    _, settings, unknown = load_settings(BASE, {"EPLB_INTERVALL": "5", "EPLB_CONFIG": ""})
    assert unknown == ["EPLB_INTERVALL"] and settings["interval"].value == 1000


def test_render_toml_quotes_strings_safely(tmp_path: Path) -> None:
    _, settings, _ = load_settings([*BASE, "--run-dir", str(tmp_path / 'a "b"\\c')], {})
    printed = write(tmp_path / "p.toml", render_toml(BY_NAME, settings))
    assert config_from_argv(["--config", str(printed)], {}).run_dir == tmp_path / 'a "b"\\c'


def test_parse_http() -> None:
    assert config_from_argv(BASE, {}).http == ("127.0.0.1", 9750)  # loopback unless told
    assert parse_http("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_http(":9750") == ("0.0.0.0", 9750)
    assert parse_http("[::1]:80") == ("::1", 80)
    assert parse_http("off") is None
    with pytest.raises(ValueError):
        parse_http("127.0.0.1:99999")


def test_the_planner_settings_reach_the_leader_and_stable_is_the_default() -> None:
    cfg = config_from_argv(BASE, {})
    assert cfg.leader.planner.policy == "stable" and cfg.leader.planner.max_moves == 0
    cfg = config_from_argv([*BASE, "--max-moves", "40"], {"EPLB_POLICY": "deepseek",
                                                          "EPLB_NUM_GROUPS": "8"})
    spec = cfg.leader.planner
    assert (spec.policy, spec.num_groups, spec.num_nodes, spec.max_moves) == ("deepseek", 8, 2, 40)
    with pytest.raises((ConfigError, SystemExit)):
        config_from_argv([*BASE, "--max-moves", "-1"], {})
