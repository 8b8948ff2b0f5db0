"""gatewayd: an edge gateway daemon for AWS IoT Core with a TPM-held identity."""

__version__ = "0.1.0"
