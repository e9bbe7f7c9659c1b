"""Where everything lives in the kvstore (all under ``cilia/``), and how keys are read back.

    cilia/state/identities/v1/id/<ID>                  JSON list of the labels       (no lease)
    cilia/state/identities/v1/labels/<labels>          "<ID>"                         (no lease)
    cilia/state/identities/v1/refs/<ID>/<node>         ""                             (node's lease)
    cilia/state/ip/v1/default/<address>                JSON {ip, identity, node}      (node's lease)
    cilia/state/nodes/v1/default/<node>                JSON {name, ip, podCIDR, ...}  (node's lease)

The ``id`` and ``labels`` keys of an identity are created together in one transaction (neither
existed), so one label set has one ID and one ID one label set; a node's ``refs`` key says it uses
the identity, and vanishes with the node's lease. Label strings are percent-encoded one by one
and joined with ``;`` so the labels key reads back exactly.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

ROOT = "cilia/"
IDENTITIES = "cilia/state/identities/v1/"
ID = IDENTITIES + "id/"
LABELS = IDENTITIES + "labels/"
REFS = IDENTITIES + "refs/"
IPCACHE = "cilia/state/ip/v1/default/"
NODES = "cilia/state/nodes/v1/default/"


def id_key(identity: int) -> str:
    return f"{ID}{identity}"


def labels_key(labels: list[str]) -> str:
    return LABELS + ";".join(quote(label, safe=":=@") for label in sorted(labels))


def refs_prefix(identity: int) -> str:
    return f"{REFS}{identity}/"


def ref_key(identity: int, node: str) -> str:
    return f"{REFS}{identity}/{quote(node, safe='')}"


def ip_key(address: str) -> str:
    return IPCACHE + address


def node_key(name: str) -> str:
    return NODES + quote(name, safe="")


def parse_id_key(key: str) -> int:
    """The ID of an ``id/<ID>`` key; ValueError for anything else."""
    if not key.startswith(ID):
        raise ValueError(f"not an identity key: {key!r}")
    text = key[len(ID):]
    if not text.isdigit():
        raise ValueError(f"identity key {key!r}: {text!r} is not a number")
    return int(text)


def parse_ref_key(key: str) -> tuple[int, str]:
    if not key.startswith(REFS):
        raise ValueError(f"not a reference key: {key!r}")
    ident, sep, node = key[len(REFS):].partition("/")
    if not sep or not ident.isdigit() or not node:
        raise ValueError(f"reference key {key!r}: expected refs/<ID>/<node>")
    return int(ident), unquote(node)


def name_of(key: str, prefix: str) -> str:
    return unquote(key[len(prefix):])
