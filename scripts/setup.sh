#!/usr/bin/env bash
# Installs what cilia needs, idempotently: Debian packages (apt) and Python
# packages into .venv. A second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the project needs (one per line in scripts/apt-packages.txt).
mapfile -t APT_PKGS < <(sed -e "s/#.*//" -e "s/[[:space:]]*$//" scripts/apt-packages.txt | grep -v "^\s*$" || true)
missing=()
for pkg in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# A python3 that can make a venv is needed; Debian's python3 needs python3-venv for it.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
fi
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cilia needs Python >= 3.11")'

# bcc compiles BPF programs at run time against the running kernel's headers. This kernel ships
# none; Debian's linux-headers-amd64 serve for tc programs, linked where bcc looks.
moddir="/lib/modules/$(uname -r)"
hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)"
if [ -n "$hdr" ] && [ ! -e "$moddir/build" ] && [ "$(id -u)" -eq 0 ]; then
    echo "setup: linking $moddir/build -> $hdr"
    mkdir -p "$moddir"
    ln -sfn "$hdr" "$moddir/build"
    ln -sfn "${hdr%-amd64}-common" "$moddir/source"
fi

# Python packages: reinstall only when pyproject.toml changed since the last install.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.cilia-installed"
want="$(cat pyproject.toml examples/r2d2/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1
    # pip's stderr is mostly build-backend chatter: show it only if the install fails.
    # the example L7 parser plugin too: its tests use it installed, as a user would
    if ! .venv/bin/python -m pip install -q -e '.[test]' -e examples/r2d2 2> .venv/pip-install.log; then
        cat .venv/pip-install.log >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi

# bcc's Python module comes from Debian (python3-bpfcc; PyPI's "bcc" is another project). The
# venv sees it through a .pth naming a directory that holds only a link to it.
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
    site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p .venv/bcc-link
    ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-link/bcc
    echo "$PWD/.venv/bcc-link" > "$site/cilia-bcc.pth"
fi

# The L7 parsers inside Envoy: a dynamic module embedding this venv's Python, built for the pinned
# Envoy (cilia.envoy.inproc.build checks its ABI), and Kafka's decoder compiled with mypyc for it.
# Without the module the agent keeps the parsers on ext_proc.
if ! .venv/bin/python -m cilia.envoy.inproc.build >/dev/null; then
    echo "setup: the in-process L7 module was not built; the L7 parsers will run on network ext_proc" >&2
fi

# The DNS proxy's fast lane (C): judged queries and released answers passed on without Python.
if ! .venv/bin/python -m cilia.dnsproxy.lane >/dev/null; then
    echo "setup: the DNS proxy's fast lane was not built; the proxy runs in Python alone (slower)" >&2
fi
