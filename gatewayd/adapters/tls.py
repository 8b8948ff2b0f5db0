"""TLS client contexts for the uplink (the `ssl` module).

Mutual TLS 1.2+ with hostname verification against the endpoint name, trusting only the bundle the validation
mode built. ALPN `x-amzn-mqtt-ca` is how AWS IoT Core accepts MQTT with client certificates on port 443
(AWS IoT developer guide, "Protocols, port mappings, and authentication").
"""

from __future__ import annotations

import ssl
from pathlib import Path

AWS_MQTT_ALPN = "x-amzn-mqtt-ca"


def alpn_protocols(setting: str, port: int) -> list[str]:
    match setting:
        case "auto":
            return [AWS_MQTT_ALPN] if port == 443 else []
        case "none":
            return []
        case _:
            return [setting]


def client_context(ca_bundle: Path, cert_file: Path, key_file: Path, alpn: list[str]) -> ssl.SSLContext:
    """Raises ssl.SSLError / OSError when the certificate, key or bundle cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_bundle))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


OPENSSL_TPM2_CONF = """\
# Written by gatewayd for its uplink process: the tpm2 provider first (for the TSS2 key), then default.
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
tpm2 = tpm2_sect
default = default_sect
[tpm2_sect]
activate = 1
[default_sect]
activate = 1
"""
