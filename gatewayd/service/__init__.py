"""Service: wiring of components, the composition root and the control socket (DESIGN.md layer 4)."""
