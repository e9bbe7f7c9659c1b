"""deploy/systemd/cilia-agent.service: a unit systemd accepts, running a `cilia agent` command line the
real CLI accepts, with CILIA_STATE_DIR and Restart=on-failure."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.deploy_support import DEPLOY, flags, help_text, parse_cilia

UNIT = DEPLOY / "systemd" / "cilia-agent.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def environment() -> dict[str, str]:
    """Environment= lines of the unit (the last assignment wins, as in systemd)."""
    env: dict[str, str] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_start() -> list[str]:
    """ExecStart as systemd expands it: ${VAR} is one word, $VAR splits at whitespace."""
    env = environment()
    words: list[str] = []
    for word in shlex.split(unit()["Service"]["ExecStart"]):
        if word.startswith("${") and word.endswith("}"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words.extend(env[word[1:]].split())
        else:
            words.append(word)
    return words


def test_unit_sections_and_restart() -> None:
    u = unit()
    assert u.sections() == ["Unit", "Service", "Install"]
    assert u["Service"]["Restart"] == "on-failure"
    assert u["Service"]["Type"] == "simple"
    assert u["Install"]["WantedBy"] == "multi-user.target"
    assert environment()["CILIA_STATE_DIR"] == "/var/run/cilia"


def test_exec_start_is_an_accepted_cilia_agent_command_line() -> None:
    argv = exec_start()
    assert Path(argv[0]).name == "cilia" and argv[0] == "/opt/cilia/venv/bin/cilia"  # the image's layout
    assert all(f in help_text("agent") for f in flags(argv))
    params = parse_cilia(["cilia", *argv[1:]])
    assert params["state_dir"] == environment()["CILIA_STATE_DIR"]
    assert params["datapath"] == "bpf"


def test_extra_arguments_come_from_an_optional_environment_file() -> None:
    assert unit()["Service"]["EnvironmentFile"] == "-/etc/default/cilia"  # "-": the file may be absent
    assert "$CILIA_AGENT_ARGS" in unit()["Service"]["ExecStart"]
    params = parse_cilia(["cilia", *exec_start()[1:], *shlex.split("--router-ip 10.222.0.1")])
    assert params["router_ip"] == "10.222.0.1"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointing at this checkout's cilia (it checks that it exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/cilia/venv/bin/cilia",
                                                              str(Path(sys.executable).parent / "cilia")))
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stdout + res.stderr
