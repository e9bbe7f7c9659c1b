"""Where the datapath's maps are pinned: constants only, so the CLI can show the default without
loading the BPF loader (bcc)."""

from __future__ import annotations

BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_DIR = f"{BPFFS}/cilia"
