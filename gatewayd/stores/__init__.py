"""Stores: disk state, no network (DESIGN.md layer 2)."""
