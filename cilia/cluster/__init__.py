"""Agents sharing one cluster view through the kvstore: identities (``identities``), endpoint
addresses (``ipcache``) and nodes (``nodes``), each node's records held under its lease
(``session``). Key layout: ``keys``."""
