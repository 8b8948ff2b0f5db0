"""A local stand-in for AWS IoT Core: mosquitto on 127.0.0.1 with mutual-TLS listeners.

- `rsa` endpoint: server certificate chained (through an intermediate) to a stand-in RSA root, like
  Amazon Root CA 1; `ecc` endpoint: chained to a stand-in ECC root, like Amazon Root CA 3. Both present a
  certificate for the same stand-in endpoint name and require a client certificate from the stand-in
  device CA.
- `observer` listener: plain MQTT on 127.0.0.1 only, the stand-in's back office for tests and the demo to
  watch what arrives (AWS IoT has no such thing; it is never the gateway's target).
- Faulty endpoints for refusal tests, all RSA-rooted: `expired` (server certificate expired), `wrongname`
  (certificate for another host name), and `cross` (a chain ending in the RSA root cross-signed by a
  "Starfield"-like root, as AWS's chains are).
- `catalog.json` and `system-bundle.pem`: the stand-in roots in the roles of Amazon's (RSA root in mode rsa,
  ECC root in mode ecc, both in all), for gatewayd's GATEWAYD_DEV_ROOT_CATALOG and upstream.system_ca_bundle;
  the bundle also holds the Starfield-like root, which no mode selects.

Ports are ephemeral and kept across restart(), so a client can reconnect to the same address.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.stores.atomic import write_file
from gatewayd_dev import pki
from gatewayd_dev.procs import Proc, StartError, current_user, free_port, port_open, wait_for

ENDPOINT_NAME = "standin-ats.iot.local.gatewayd.test"  # .test is reserved (RFC 6761): never a real host


@dataclass(frozen=True)
class Endpoint:
    name: str  # "rsa" or "ecc"
    port: int
    hostname: str
    root_file: Path  # the root CA a client must trust for this endpoint


@dataclass(frozen=True)
class ClientFiles:
    cert: Path
    key: Path


class StandIn:
    def __init__(
        self,
        workdir: Path,
        endpoint_name: str = ENDPOINT_NAME,
        persistent: bool = False,
        tuning: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.tuning = tuning  # extra global mosquitto options (the benchmark lifts queue limits)
        # persistent: mosquitto keeps sessions across its restarts (an observer's queue survives an outage)
        self.persistent = persistent
        self.endpoint_name = endpoint_name
        self.proc: Proc | None = None
        self.ports = {"rsa": 0, "ecc": 0, "observer": 0, "expired": 0, "wrongname": 0, "cross": 0}
        self._device_ca: pki.Issued | None = None
        self.refused: dict[int, str] = {}  # serial -> status, for device certificates that are not ACTIVE

    # -------------------------------------------------------------- PKI

    def _make_pki(self) -> None:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        for kind in ("rsa", "ecc"):
            root = pki.make_root(f"Stand-in Root CA {kind.upper()}", kind)
            inter = pki.make_intermediate(root, f"Stand-in {kind.upper()} Server CA", kind)
            server = pki.make_server(inter, [self.endpoint_name], kind)
            pki.write(d / f"root-{kind}.pem", root.cert_pem())
            pki.write(d / f"server-{kind}-chain.pem", pki.pem(server.cert, inter.cert))
            pki.write(d / f"server-{kind}.key", server.key_pem(), 0o600)
            if kind == "rsa":
                rsa_root, rsa_inter = root, inter
            else:
                ecc_root = root
        self._device_ca = pki.make_root("Stand-in Device CA", "ecc")
        pki.write(d / "device-ca.pem", self._device_ca.cert_pem())
        pki.write(d / "device-ca.key", self._device_ca.key_pem(), 0o600)  # for issuing commands (renewal)
        self._write_crl()
        # Faulty endpoints, all under the RSA root.
        past = pki.Validity(
            dt.datetime.now(dt.UTC) - dt.timedelta(days=30), dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        )
        expired = pki.make_server(rsa_inter, [self.endpoint_name], "rsa", past)
        wrong = pki.make_server(rsa_inter, ["other-ats.iot.local.gatewayd.test"], "rsa")
        starfield = pki.make_root("Stand-in Starfield Services Root", "rsa")
        cross = pki.make_cross_signed(rsa_root, starfield)
        good = pki.make_server(rsa_inter, [self.endpoint_name], "rsa")
        for name, server, chain in (
            ("expired", expired, [rsa_inter.cert]),
            ("wrongname", wrong, [rsa_inter.cert]),
            ("cross", good, [rsa_inter.cert, cross]),
        ):
            pki.write(d / f"server-{name}-chain.pem", pki.pem(server.cert, *chain))
            pki.write(d / f"server-{name}.key", server.key_pem(), 0o600)
        pki.write(d / "starfield-root.pem", starfield.cert_pem())

        # The stand-in roots in Amazon's roles, selected by fingerprint like the real ones.
        def entry(issued: pki.Issued, algorithm: str) -> dict[str, str]:
            return {
                "name": pki.cn(issued.cert),
                "sha256": pki.fingerprint(issued.cert),
                "algorithm": algorithm,
            }

        catalog = {
            "roots": [entry(rsa_root, "RSA 2048"), entry(ecc_root, "ECC P-256")],
            "modes": {
                "rsa": [pki.cn(rsa_root.cert)],
                "ecc": [pki.cn(ecc_root.cert)],
                "all": [pki.cn(rsa_root.cert), pki.cn(ecc_root.cert)],
            },
        }
        pki.write(d / "catalog.json", json.dumps(catalog, indent=2).encode())
        pki.write(d / "system-bundle.pem", pki.pem(starfield.cert, rsa_root.cert, ecc_root.cert))

    @property
    def device_ca(self) -> pki.Issued:
        assert self._device_ca is not None, "start() first"
        return self._device_ca

    @property
    def device_ca_file(self) -> Path:
        return self.workdir / "device-ca.pem"

    def issue_command(self, *extra: str) -> list[str]:
        """argv of a renewal `command` issuer signing with the stand-in device CA (gatewayd_dev.issue_cmd)."""
        ca_key = self.workdir / "device-ca.key"
        return [sys.executable, "-m", "gatewayd_dev.issue_cmd", "--ca-cert", str(self.device_ca_file),
                "--ca-key", str(ca_key), *extra]  # fmt: skip

    def endpoint(self, name: str) -> Endpoint:
        root = "ecc" if name == "ecc" else "rsa"
        return Endpoint(name, self.ports[name], self.endpoint_name, self.workdir / f"root-{root}.pem")

    @property
    def catalog_file(self) -> Path:
        return self.workdir / "catalog.json"

    @property
    def system_bundle_file(self) -> Path:
        return self.workdir / "system-bundle.pem"

    def gateway_env(self) -> dict[str, str]:
        """Environment for a gatewayd that should treat the stand-in roots as Amazon's."""
        return {"GATEWAYD_DEV_ROOT_CATALOG": str(self.catalog_file)}

    @property
    def observer_port(self) -> int:
        return self.ports["observer"]

    def sign_csr(self, csr_pem: bytes, days: float = 365) -> bytes:
        """A client certificate (PEM) from the stand-in device CA for this CSR."""
        return pki.pem(pki.sign_client_csr(self.device_ca, csr_pem, pki.Validity.days(days)))

    def set_status(self, cert: x509.Certificate, status: str) -> None:
        """AWS IoT's certificate status, enforced at connection time: a certificate that is not ACTIVE
        (PENDING_ACTIVATION, INACTIVE, REVOKED) is on the device CA's CRL, which mosquitto re-reads on SIGHUP.
        Existing connections stay, as they do on AWS IoT until it disconnects them."""
        if status == "ACTIVE":
            self.refused.pop(cert.serial_number, None)
        else:
            self.refused[cert.serial_number] = status
        self._write_crl()
        if self.proc is not None and self.proc.alive():
            os.kill(self.proc.pid, signal.SIGHUP)
            time.sleep(0.2)  # mosquitto reloads between network events; give it a moment

    def _write_crl(self) -> None:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.device_ca.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=7))
        )
        for serial in self.refused:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        assert self.device_ca.key is not None
        crl = builder.sign(self.device_ca.key, hashes.SHA256())
        write_file(self.workdir / "device-ca.crl", crl.public_bytes(serialization.Encoding.PEM))

    def client_files(self, cn: str, days: float = 365) -> ClientFiles:
        """A software-key client identity accepted by the TLS endpoints (for tests and simulated devices)."""
        issued = pki.make_client(self.device_ca, cn, validity=pki.Validity.days(days))
        cert = pki.write(self.workdir / f"client-{cn}.pem", issued.cert_pem())
        key = pki.write(self.workdir / f"client-{cn}.key", issued.key_pem(), 0o600)
        return ClientFiles(cert, key)

    # -------------------------------------------------------------- broker

    def _config(self) -> str:
        d = self.workdir
        lines = [
            "# generated by gatewayd_dev.standin",
            *(
                [f"persistence true\npersistence_location {d}/", "autosave_interval 1"]
                if self.persistent
                else ["persistence false"]
            ),
            f"log_dest file {d / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            *self.tuning,
            "allow_anonymous true",
            f"user {current_user()}",
            "",
            f"listener {self.ports['observer']} 127.0.0.1",
        ]
        for kind in ("rsa", "ecc", "expired", "wrongname", "cross"):
            lines += [
                "",
                f"listener {self.ports[kind]} 127.0.0.1",
                f"certfile {d / f'server-{kind}-chain.pem'}",
                f"keyfile {d / f'server-{kind}.key'}",
                f"cafile {d / 'device-ca.pem'}",
                f"crlfile {d / 'device-ca.crl'}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> StandIn:
        if self.proc is not None and self.proc.alive():
            return self  # running already (a test's cleanup may start it again): never a second mosquitto
        if self._device_ca is None:
            self._make_pki()
        fresh = not all(self.ports.values())
        for attempt in range(3):
            if fresh:
                self.ports = {name: free_port() for name in self.ports}
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self._config())
            self.proc = Proc("mosquitto", ["mosquitto", "-c", str(conf)], self.workdir / "mosquitto.stdout")
            try:
                wait_for("mosquitto", lambda: all(port_open(p) for p in self.ports.values()), self.proc)
                return self
            except StartError:
                self.proc.stop()
                # A port found free was taken before mosquitto bound it (the client side of some other
                # connection): with ports of its own choosing the stand-in tries again; restart() keeps them.
                if not fresh or attempt == 2:
                    raise
            except BaseException:
                self.proc.stop()
                raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mqtt_tls_probe(
    port: int,
    server_hostname: str,
    cafile: Path,
    client: ClientFiles | None,
    client_id: str = "probe",
    host: str = "127.0.0.1",
    alpn: list[str] | None = None,
) -> int:
    """TLS handshake (hostname verified against `server_hostname`) plus MQTT 3.1.1 CONNECT.

    Returns the CONNACK return code (0 = accepted). Raises ssl.SSLError / OSError when TLS fails.
    """
    ctx = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    cid = client_id.encode()
    # MQTT 3.1.1 CONNECT (section 3.1): protocol name, level 4, clean session, keepalive 30 s, client id.
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    packet = bytes([0x10, len(body)]) + body
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(packet)
        connack = b""
        while len(connack) < 4:
            chunk = tls.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("connection closed before CONNACK")
            connack += chunk
    if connack[0] != 0x20:
        raise ConnectionError(f"expected CONNACK, got packet type {connack[0] >> 4}")
    return connack[3]
