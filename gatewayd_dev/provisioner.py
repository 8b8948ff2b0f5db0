"""The stand-in's fleet provisioning responder: AWS IoT's CreateCertificateFromCsr and RegisterThing MQTT APIs
(AWS IoT developer guide, "Device provisioning MQTT API"; JSON payload format), answered on the stand-in
broker with AWS's topic names and JSON fields. Certificates come from the stand-in device CA.

Faults, to test every way the service can fail (`fault=`): "reject-csr" and "reject-register" (a rejection
with statusCode/errorCode/errorMessage), "no-answer" (CreateCertificateFromCsr never answers),
"never-activate" (RegisterThing never answers: the certificate is never activated), "not-activated"
(RegisterThing accepts, but the certificate stays PENDING_ACTIVATION), "other-key" (a certificate for a
different key), "expired" (an already expired certificate), "wrong-thing" (RegisterThing provisions another
thing).

Certificate status is enforced at connection time as AWS IoT does: a new certificate is PENDING_ACTIVATION
(refused by the stand-in's TLS endpoints, StandIn.set_status) until RegisterThing activates it.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd_dev import pki
from gatewayd_dev.sensor import PAHO2, wait_until
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


class Provisioner:
    def __init__(self, stack: DevStack, template: str, thing_name: str, minutes: float = 600) -> None:
        self.stack = stack
        self.template = template
        self.thing_name = thing_name
        self.minutes = minutes
        self.fault: str | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.certificates: dict[str, str] = {}  # certificate id -> status (PENDING_ACTIVATION, ACTIVE)
        self._issued: dict[str, x509.Certificate] = {}
        self._tokens: dict[str, str] = {}  # ownership token -> certificate id
        self._lock = threading.Lock()
        if PAHO2:
            from paho.mqtt.enums import CallbackAPIVersion

            self.client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=f"provisioner-{secrets.token_hex(4)}"
            )
        else:
            self.client = paho.Client(client_id=f"provisioner-{secrets.token_hex(4)}")
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> Provisioner:
        self.client.connect("127.0.0.1", self.stack.standin.observer_port, 30)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the provisioner's subscriptions")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, *rest: Any) -> None:
        client.subscribe([(CSR_TOPIC, 1), ("$aws/provisioning-templates/+/provision/json", 1)])

    def _reply(self, topic: str, body: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(body), qos=1)

    def _reject(self, topic: str, status: int, code: str, message: str) -> None:
        self._reply(f"{topic}/rejected", {"statusCode": status, "errorCode": code, "errorMessage": message})

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {}
        with self._lock:
            self.requests.append((msg.topic, body))
        if msg.topic == CSR_TOPIC:
            self._create_from_csr(msg.topic, body)
        else:
            self._register_thing(msg.topic, body)

    def _create_from_csr(self, topic: str, body: dict[str, Any]) -> None:
        if self.fault == "no-answer":
            return
        if self.fault == "reject-csr":
            self._reject(topic, 400, "InvalidCSR", "The CSR was malformed (stand-in fault)")
            return
        try:
            csr_pem = str(body["certificateSigningRequest"]).encode()
            x509.load_pem_x509_csr(csr_pem)
        except (KeyError, ValueError):
            self._reject(topic, 400, "InvalidCSR", "certificateSigningRequest is not a PEM CSR")
            return
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
            self._tokens[token] = cid
        self.stack.standin.set_status(cert, "PENDING_ACTIVATION")
        self._reply(
            f"{topic}/accepted",
            {
                "certificateOwnershipToken": token,
                "certificateId": cid,
                "certificatePem": pki.pem(cert).decode(),
            },
        )

    def _register_thing(self, topic: str, body: dict[str, Any]) -> None:
        template = topic.split("/")[2]
        if self.fault == "never-activate":
            return
        if template != self.template:
            self._reject(topic, 404, "ResourceNotFoundException", f"no provisioning template {template}")
            return
        if self.fault == "reject-register":
            self._reject(topic, 400, "InvalidParametersException", "The template rejected the parameters")
            return
        with self._lock:
            cid = self._tokens.pop(str(body.get("certificateOwnershipToken")), None)
        if cid is None:
            self._reject(topic, 400, "InvalidCertificateOwnershipToken", "unknown or used ownership token")
            return
        if self.fault != "not-activated":
            with self._lock:
                self.certificates[cid] = "ACTIVE"
            self.stack.standin.set_status(self._issued[cid], "ACTIVE")
        thing = "someone-else" if self.fault == "wrong-thing" else self.thing_name
        self._reply(f"{topic}/accepted", {"deviceConfiguration": {}, "thingName": thing})
