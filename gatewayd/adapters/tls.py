"""TLS client contexts for the uplink (the `ssl` module).

Mutual TLS 1.2+ with hostname verification against the endpoint name, trusting only the bundle the validation
mode built. ALPN `x-amzn-mqtt-ca` is how AWS IoT Core accepts MQTT with client certificates on port 443
(AWS IoT developer guide, "Protocols, port mappings, and authentication").
"""

from __future__ import annotations

import socket
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


# TLS 1.2 suites, both ways (the listener and the uplink): forward-secret key exchange and AEAD ciphers only
# (no CBC with SHA-1, no static RSA). AWS IoT Core offers ECDHE with AES-GCM; TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def client_context(ca_bundle: Path, cert_file: Path, key_file: Path, alpn: list[str]) -> ssl.SSLContext:
    """Raises ssl.SSLError / OSError when the certificate, key or bundle cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_verify_locations(cafile=str(ca_bundle))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def peer_certificate(
    ca_bundle: Path, cert_file: Path, key_file: Path, alpn: list[str], host: str, port: int, address: str = ""
) -> bytes | None:
    """The server's certificate (DER), fetched without verifying it, or None: only to say in a message why
    verification failed (its dates against this gateway's clock). Nothing is sent over this connection."""
    ctx = client_context(ca_bundle, cert_file, key_file, alpn)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((address or host, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls_sock,
        ):
            return tls_sock.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


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
