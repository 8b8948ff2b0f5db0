"""The stand-in's fleet provisioning responder: AWS IoT's CreateCertificateFromCsr and RegisterThing MQTT APIs
(AWS IoT developer guide, "Device provisioning MQTT API"; JSON payload format), with AWS's topic names, JSON
fields and rules. Certificates come from the stand-in device CA.

AWS IoT answers a provisioning request only on the connection that made it, and only if that connection
subscribed to the answer's topic; mosquitto cannot address one connection, so the responder is a front of its
own: a TLS endpoint (`port`: the stand-in's RSA endpoint certificate, client certificates from the device CA,
refused when not ACTIVE) that relays each connection to the stand-in's mosquitto, takes the provisioning
requests out of the stream and answers them on that connection alone. An ownership token is valid for an
hour (`token_age_offset` fakes the passing of time for tests), once; RegisterThing checks the template's
required parameters (`required_parameters`) as AWS does.

Faults, to test every way the service can fail (`fault=`): "reject-csr" and "reject-register" (a rejection
with statusCode/errorCode/errorMessage), "no-answer" (CreateCertificateFromCsr never answers),
"never-activate" (RegisterThing never answers: the certificate is never activated), "not-activated"
(RegisterThing accepts, but the certificate stays PENDING_ACTIVATION), "other-key" (a certificate for a
different key), "expired" (an already expired certificate), "wrong-thing" (RegisterThing provisions another
thing).

Certificate status is enforced at connection time as AWS IoT does: a new certificate is PENDING_ACTIVATION
(refused by the stand-in's TLS endpoints and this one, StandIn.set_status) until RegisterThing activates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.core.mqtt.topics import matches
from gatewayd_dev import pki
from gatewayd_dev.procs import free_port
from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
FAULTS = (
    "reject-csr",
    "reject-register",
    "no-answer",
    "never-activate",
    "not-activated",
    "other-key",
    "expired",
    "wrong-thing",
)
TOKEN_LIFETIME = 3600.0  # s: AWS IoT's certificate ownership tokens expire after one hour


def _is_request(topic: str) -> bool:
    parts = topic.split("/")
    template = len(parts) == 5 and parts[:2] == ["$aws", "provisioning-templates"] and parts[3:] == [
        "provision", "json"]  # fmt: skip
    return topic == CSR_TOPIC or template


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _skip_properties(body: bytes, pos: int) -> int:
    length, shift = 0, 0
    while True:
        byte = body[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return pos + length


def _string(body: bytes, pos: int) -> tuple[str, int]:
    n = int.from_bytes(body[pos : pos + 2], "big")
    return body[pos + 2 : pos + 2 + n].decode(), pos + 2 + n


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    version: int = 4
    subscriptions: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, packet: bytes) -> None:
        async with self.lock:  # whole packets only: an injected answer never lands inside a relayed one
            self.writer.write(packet)
            await self.writer.drain()

    def publish_packet(self, topic: str, payload: bytes) -> bytes:
        """A QoS 0 PUBLISH (AWS sends at the subscription's QoS; 0 keeps the relayed packet ids apart)."""
        name = topic.encode()
        body = len(name).to_bytes(2, "big") + name + (b"\x00" if self.version == 5 else b"") + payload
        return b"\x30" + _varint(len(body)) + body


class Provisioner:
    def __init__(
        self,
        stack: DevStack,
        template: str,
        thing_name: str,
        minutes: float = 600,
        required_parameters: tuple[str, ...] = (),
    ) -> None:
        self.stack = stack
        self.template = template
        self.thing_name = thing_name
        self.minutes = minutes
        self.required_parameters = required_parameters  # the template's parameters without a default
        self.token_age_offset = 0.0  # s added to every token's age: a fake of time, for expiry tests
        self.fault: str | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.undelivered: list[str] = []  # answers AWS would not deliver: the asking connection had not
        # subscribed to their topic
        self.certificates: dict[str, str] = {}  # certificate id -> status (PENDING_ACTIVATION, ACTIVE)
        self._issued: dict[str, x509.Certificate] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # ownership token -> (certificate id, issued at)
        self._lock = threading.Lock()
        self.port = free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()

    # -------------------------------------------------------------- the front

    def start(self) -> Provisioner:
        self._thread = threading.Thread(target=self._run, name="provisioner", daemon=True)
        self._thread.start()
        wait_until(self._ready.is_set, 10, "the provisioner's endpoint")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _tls(self) -> ssl.SSLContext:
        """Made for each connection: it reads the device CA's CRL as it is now (StandIn.set_status)."""
        d = self.stack.standin.workdir
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "server-rsa-chain.pem", d / "server-rsa.key")
        ctx.load_verify_locations(d / "device-ca.pem")
        ctx.load_verify_locations(d / "device-ca.crl")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker: asyncio.StreamWriter | None = None
        try:
            await writer.start_tls(self._tls())
            from_broker, broker = await asyncio.open_connection("127.0.0.1", self.stack.standin.observer_port)
            conn = _Connection(writer)
            pumps = [
                asyncio.create_task(self._from_client(reader, broker, conn)),
                asyncio.create_task(self._from_broker(from_broker, conn)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # a refused handshake (a certificate that is not ACTIVE) or a closed connection
        finally:
            for w in (writer, broker):
                if w is not None:
                    w.close()

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> tuple[bytes, int, bytes]:
        head = await reader.readexactly(1)
        raw, length, shift = bytearray(), 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            raw.append(byte)
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = await reader.readexactly(length)
        return head + bytes(raw) + body, head[0], body

    async def _from_broker(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                packet, _, _ = await self._packet(reader)
                await conn.send(packet)

    async def _from_client(
        self, reader: asyncio.StreamReader, broker: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                packet, head, body = await self._packet(reader)
                kind = head >> 4
                if kind == 1:  # CONNECT: the protocol level follows the protocol name
                    _, pos = _string(body, 0)
                    conn.version = body[pos]
                elif kind in (8, 10):  # SUBSCRIBE, UNSUBSCRIBE: who asked for what
                    self._note_subscriptions(kind, body, conn)
                elif kind == 3:
                    topic, pos = _string(body, 0)
                    if _is_request(topic):
                        await self._request(head, body, topic, pos, conn)
                        continue  # answered here; mosquitto never sees it
                broker.write(packet)
                await broker.drain()

    @staticmethod
    def _note_subscriptions(kind: int, body: bytes, conn: _Connection) -> None:
        pos = 2
        if conn.version == 5:
            pos = _skip_properties(body, pos)
        while pos < len(body):
            topic_filter, pos = _string(body, pos)
            if kind == 8:
                pos += 1  # the subscription options
                conn.subscriptions.add(topic_filter)
            else:
                conn.subscriptions.discard(topic_filter)

    async def _request(self, head: int, body: bytes, topic: str, pos: int, conn: _Connection) -> None:
        qos = (head >> 1) & 0x03
        if qos:
            packet_id = body[pos : pos + 2]
            pos += 2
            await conn.send(b"\x40\x02" + packet_id)  # PUBACK (QoS 2 is not offered by AWS IoT)
        if conn.version == 5:
            pos = _skip_properties(body, pos)
        try:
            request = json.loads(body[pos:])
        except ValueError:
            request = {}
        with self._lock:
            self.requests.append((topic, request if isinstance(request, dict) else {}))
        answers = self._answer(topic, request if isinstance(request, dict) else {})
        for answer_topic, answer in answers:
            if any(matches(f, answer_topic) for f in conn.subscriptions):
                await conn.send(conn.publish_packet(answer_topic, json.dumps(answer).encode()))
            else:
                with self._lock:
                    self.undelivered.append(answer_topic)

    # -------------------------------------------------------------- AWS IoT's answers

    def _answer(self, topic: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if topic == CSR_TOPIC:
            return self._create_from_csr(topic, body)
        return self._register_thing(topic, body)

    @staticmethod
    def _rejected(topic: str, status: int, code: str, message: str) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{topic}/rejected", {"statusCode": status, "errorCode": code, "errorMessage": message})]

    def _create_from_csr(self, topic: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self.fault == "no-answer":
            return []
        if self.fault == "reject-csr":
            return self._rejected(topic, 400, "InvalidCSR", "The CSR was malformed (stand-in fault)")
        try:
            csr_pem = str(body["certificateSigningRequest"]).encode()
            x509.load_pem_x509_csr(csr_pem)
        except (KeyError, ValueError):
            return self._rejected(topic, 400, "InvalidCSR", "certificateSigningRequest is not a PEM CSR")
        validity = pki.Validity.days(self.minutes / 1440)
        if self.fault == "expired":
            start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
            validity = pki.Validity(start, start + dt.timedelta(days=1))
        if self.fault == "other-key":
            other = pki.new_key("ecc")
            subject = x509.load_pem_x509_csr(csr_pem).subject
            csr_pem = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(subject)
                .sign(other, hashes.SHA256())
                .public_bytes(serialization.Encoding.PEM)
            )
        cert = pki.sign_client_csr(self.stack.standin.device_ca, csr_pem, validity)
        cid = pki.fingerprint(cert)
        token = secrets.token_hex(32)
        with self._lock:
            self.certificates[cid] = "PENDING_ACTIVATION"
            self._issued[cid] = cert
            self._tokens[token] = (cid, time.monotonic())
        self.stack.standin.set_status(cert, "PENDING_ACTIVATION")
        accepted = {"certificateOwnershipToken": token, "certificateId": cid,
                    "certificatePem": pki.pem(cert).decode()}  # fmt: skip
        return [(f"{topic}/accepted", accepted)]

    def _register_thing(self, topic: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        template = topic.split("/")[2]
        if self.fault == "never-activate":
            return []
        if template != self.template:
            return self._rejected(
                topic, 404, "ResourceNotFoundException", f"no provisioning template {template}"
            )
        if self.fault == "reject-register":
            return self._rejected(
                topic, 400, "InvalidParametersException", "The template rejected the parameters"
            )
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
            return self._rejected(
                topic, 400, "InvalidParametersException", "parameters must map names to strings"
            )
        missing = [p for p in self.required_parameters if p not in parameters]
        if missing:
            return self._rejected(
                topic,
                400,
                "InvalidParametersException",
                f"template {template} needs parameter(s) {', '.join(missing)}",
            )
        with self._lock:
            found = self._tokens.pop(str(body.get("certificateOwnershipToken")), None)
        if found is None:
            return self._rejected(
                topic, 400, "InvalidCertificateOwnershipToken", "unknown or used ownership token"
            )
        cid, issued_at = found
        if time.monotonic() - issued_at + self.token_age_offset > TOKEN_LIFETIME:
            return self._rejected(
                topic, 400, "InvalidCertificateOwnershipToken", "the ownership token has expired"
            )
        if self.fault != "not-activated":
            with self._lock:
                self.certificates[cid] = "ACTIVE"
            self.stack.standin.set_status(self._issued[cid], "ACTIVE")
        thing = "someone-else" if self.fault == "wrong-thing" else self.thing_name
        return [(f"{topic}/accepted", {"deviceConfiguration": {}, "thingName": thing})]
