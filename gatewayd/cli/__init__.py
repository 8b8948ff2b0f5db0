"""Command-line entry points (DESIGN.md layer 5)."""
