"""Adapters: the only modules importing third-party I/O libraries, one library each.

Layer 3 of docs/architecture.md.
"""
