"""Service: wiring of components, the composition root and the control socket.

Layer 4 of docs/architecture.md.
"""
