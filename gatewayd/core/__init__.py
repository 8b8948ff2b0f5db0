"""Pure core: standard library only, no sockets, no threads, no clock reads.

Layer 1 of docs/architecture.md.
"""
