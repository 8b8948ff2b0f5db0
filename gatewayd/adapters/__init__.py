"""Adapters: the only modules importing third-party I/O libraries, one library each (DESIGN.md layer 3)."""
