"""The `cilia` command line (click)."""
