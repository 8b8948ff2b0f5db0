"""Development and test tooling for gatewayd: the dev stack (software TPM, AWS IoT stand-in) and the demo.

Not part of the daemon and not shipped in the .deb; used by the pytest fixtures and `make demo`.
"""
