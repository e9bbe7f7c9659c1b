"""The mypyc-compiled parser modules for the interpreter inside Envoy: built from the sources,
used only while they match them (a stale build falls back to the pure-Python modules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cilia.envoy.inproc import build

PROBE = """
import json, sys
from cilia.envoy.inproc.host import use_compiled
used = use_compiled(sys.argv[1])
import cilia.l7parsers.kafka_codec as codec
print(json.dumps([used, codec.__file__]))
"""


def _probe(module_dir: Path) -> list[object]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(module_dir)], capture_output=True, text=True, check=True)
    result: list[object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_compiled_modules_are_used_only_while_they_match_the_sources(tmp_path: Path) -> None:
    compiled = build.build_compiled(tmp_path)
    assert sorted(p.name.split(".")[0] for p in (compiled / "cilia" / "l7parsers").glob("*.so")) == [
        "kafka_codec", "kafka_topics"]
    used, where = _probe(tmp_path)
    assert used is True and str(where).endswith(".so")
    stamp = compiled / "stamp.json"
    hashes = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**hashes, build.COMPILED[0]: "0" * 64}))  # as if the source had changed
    used, where = _probe(tmp_path)
    assert used is False and str(where).endswith("kafka_codec.py")
