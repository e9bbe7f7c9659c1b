"""Test configuration: tests/ is on sys.path, so test modules import `helpers`.

The support modules of tests/agent (a real agent, BPF nodes) and tests/l7parsers (real servers
for Kafka, Cassandra, Memcached; the relay) are on it too, for the end-to-end tests that need both.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _sub in ("agent", "l7parsers"):
    if str(_HERE / _sub) not in sys.path:
        sys.path.append(str(_HERE / _sub))
