"""cilia.l7parsers: see docs/architecture.md (built by a later issue)."""
