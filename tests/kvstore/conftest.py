"""tests/kvstore: the kvstore interface, its etcd backend and the cluster records, against real etcd."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from etcd_support import etcd1, etcd3  # noqa: E402,F401  (fixtures)
