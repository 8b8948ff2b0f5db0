"""Command-line entry points (docs/architecture.md, layer 5)."""
