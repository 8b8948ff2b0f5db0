"""Stores: disk state, no network (docs/architecture.md, layer 2)."""
