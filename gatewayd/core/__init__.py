"""Pure core: standard library only, no sockets, no threads, no clock reads (DESIGN.md layer 1)."""
