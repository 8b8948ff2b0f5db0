"""Issuers of renewed certificates, behind one interface: `await issuer.issue(csr_pem) -> chain PEM`.

- CommandIssuer: a configured executable gets the CSR (PEM) on stdin and prints the certificate chain (PEM,
  leaf first) on stdout: EST clients, step-ca, any private PKI. A non-zero exit, a timeout or output that is
  not a certificate is an IssuerError saying which, with the command's last line of stderr.
- FleetProvisioningIssuer: AWS IoT fleet provisioning over the gateway's current uplink (AWS IoT developer
  guide, "Device provisioning MQTT API"): subscribe to the accepted/rejected topics first, publish the CSR to
  $aws/certificates/create-from-csr/json, then RegisterThing on $aws/provisioning-templates/<template>/
  provision/json with the ownership token and the configured parameters. A rejection is an IssuerError with
  AWS's statusCode, errorCode and errorMessage; no answer in time is one too.

Whether the certificate fits the key and the trust is the renewal's check, not the issuer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from gatewayd.adapters import proctree
from gatewayd.core import jsonsafe
from gatewayd.core.errors import CertificateError, GatewaydError, IssuerError
from gatewayd.stores.x509util import load_pem_certificates

MAX_OUTPUT = 256 * 1024  # a certificate chain is a few KiB; more is garbage
MAX_STDERR = 64 * 1024  # of a command's stderr, the last this many bytes are kept (all of it is read)
PIPE_GRACE = 1.0  # seconds a command's pipes may stay open after it exited (a child it left holds them)


class Issuer(Protocol):
    name: str

    async def issue(self, csr_pem: bytes) -> bytes: ...


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


async def _tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Everything until end of file, read and thrown away but for the last `keep` bytes: a chatty command
    never blocks on a full pipe."""
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > 2 * keep:
            del data[:-keep]
    return bytes(data[-keep:])


async def _read(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until end of file, but no more than `limit` bytes (the rest is left unread)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(min(65536, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class CommandIssuer:
    name = "command"

    def __init__(self, argv: tuple[str, ...], timeout: float, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        # how errors name the command: "python3 -m pkg.mod" rather than just the interpreter
        self.what = " ".join(argv[:3] if argv[1:2] == ("-m",) else argv[:1])
        self.timeout = timeout
        self.env = env or {}

    async def issue(self, csr_pem: bytes) -> bytes:
        """Run the command once. Whatever it started is killed when it is done (its process group, and
        every process carrying its mark, which children keep even after setsid)."""
        mark = proctree.new_mark()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout ends everything it started
                env={**self._environment(), proctree.MARK: mark},
            )
        except OSError as exc:
            raise IssuerError(f"cannot run {self.what}: {exc.strerror or exc}") from exc
        try:
            return await self._run(proc, csr_pem, mark)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proctree.kill_marked, mark)

    async def _run(self, proc: asyncio.subprocess.Process, csr_pem: bytes, mark: str) -> bytes:
        collect = asyncio.ensure_future(self._collect(proc, csr_pem, mark))
        try:
            out, err = await asyncio.wait_for(asyncio.shield(collect), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):  # its pipes close with it: read them to the end
                await asyncio.wait_for(collect, 5)
            collect.cancel()
            raise IssuerError(f"{self.what} did not finish within {self.timeout:g} s; killed") from None
        if len(out) > MAX_OUTPUT:
            raise IssuerError(f"{self.what} printed more than {MAX_OUTPUT} bytes: not a certificate chain")
        if proc.returncode != 0:
            detail = _last_line(err)
            raise IssuerError(
                f"{self.what} exited with status {proc.returncode}" + (f": {detail}" if detail else "")
            )
        try:
            load_pem_certificates(out, "output")
        except CertificateError as exc:
            raise IssuerError(f"{self.what} did not print a certificate: {exc}") from None
        return out

    def _environment(self) -> dict[str, str]:
        """The daemon's environment without systemd's notify and watchdog variables (the command must not
        speak for the daemon), plus GATEWAYD_THING_NAME and the like."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        return {**env, **self.env}

    async def _collect(
        self, proc: asyncio.subprocess.Process, csr_pem: bytes, mark: str
    ) -> tuple[bytes, bytes]:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may not read its stdin
            proc.stdin.write(csr_pem)
            await proc.stdin.drain()
            proc.stdin.close()

        async def stdout() -> bytes:
            assert proc.stdout is not None
            data = await _read(proc.stdout, MAX_OUTPUT + 1)
            if len(data) > MAX_OUTPUT:  # stop it now: it would block on a full pipe, we on its stderr
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                while await proc.stdout.read(65536):  # what was left in the pipe, so the pipe closes
                    pass
            return data

        pipes = asyncio.ensure_future(asyncio.gather(stdout(), _tail(proc.stderr, MAX_STDERR)))
        # Until the command exits or its pipes close. Not proc.wait(): before Python 3.12 it returns only
        # once every pipe is closed, which a child left behind can prevent for ever.
        while proc.returncode is None and not pipes.done():
            await asyncio.wait([pipes], timeout=0.05)
        try:  # a child it left behind may hold the pipes open: it is killed, and what was printed is used
            out, err = await asyncio.wait_for(asyncio.shield(pipes), PIPE_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proctree.kill_marked, mark)
            out, err = await asyncio.wait_for(pipes, 5)
        await proc.wait()
        return out, err


Route = Callable[[str, bytes], None]


class Channel(Protocol):
    """What fleet provisioning needs of the uplink (service/upstream/uplink.py:Uplink provides it)."""

    async def subscribed(self, topic_filters: list[str], timeout: float, qos: int = 1) -> None: ...

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


CSR_TOPIC = "$aws/certificates/create-from-csr/json"


class FleetProvisioningIssuer:
    name = "aws-fleet-provisioning"

    def __init__(
        self,
        uplink: Channel,
        routes: MutableMapping[str, Route],
        template: str,
        parameters: dict[str, str],
        thing_name: str,
        timeout: float,
    ) -> None:
        self.uplink = uplink
        self.routes = routes  # topic -> handler, for the replies (the upstream dispatches to it)
        self.template = template
        self.parameters = parameters
        self.thing_name = thing_name
        self.timeout = timeout

    async def issue(self, csr_pem: bytes) -> bytes:
        created = await self._call(
            "CreateCertificateFromCsr", CSR_TOPIC, {"certificateSigningRequest": csr_pem.decode()}
        )
        cert_pem, token = created.get("certificatePem"), created.get("certificateOwnershipToken")
        if not isinstance(cert_pem, str) or not isinstance(token, str):
            raise IssuerError(
                "CreateCertificateFromCsr accepted, but without certificatePem and ownership token"
            )
        try:
            load_pem_certificates(cert_pem.encode(), "certificatePem")
        except CertificateError as exc:
            raise IssuerError(f"CreateCertificateFromCsr returned no certificate: {exc}") from None
        topic = f"$aws/provisioning-templates/{self.template}/provision/json"
        registered = await self._call(
            "RegisterThing", topic, {"certificateOwnershipToken": token, "parameters": self.parameters}
        )
        thing = registered.get("thingName")
        if thing != self.thing_name:
            raise IssuerError(
                f"RegisterThing provisioned thing {thing!r}, but this gateway is {self.thing_name!r}: "
                "check the template (its ThingName must be this gateway's)"
            )
        return cert_pem.encode()

    async def _call(self, operation: str, topic: str, request: dict[str, Any]) -> dict[str, Any]:
        """One request/response exchange of the provisioning API: subscribed first, then published."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[str, bytes]] = loop.create_future()
        replies = [f"{topic}/accepted", f"{topic}/rejected"]

        def on_reply(reply_topic: str, payload: bytes) -> None:
            if not answer.done():
                answer.set_result((reply_topic, payload))

        for reply in replies:
            self.routes[reply] = on_reply
        try:
            try:
                await self.uplink.subscribed(replies, self.timeout)
                await asyncio.wait_for(
                    self.uplink.publish(topic, json.dumps(request).encode(), 1), self.timeout
                )
                reply_topic, payload = await asyncio.wait_for(answer, self.timeout)
            except TimeoutError:
                raise IssuerError(f"{operation}: no answer from AWS IoT within {self.timeout:g} s") from None
            except GatewaydError as exc:
                raise IssuerError(f"{operation}: {exc}") from None
        finally:
            for reply in replies:
                self.routes.pop(reply, None)
                self.uplink.unsubscribe(reply)
        try:
            body = jsonsafe.loads(payload)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            raise IssuerError(f"{operation}: the answer on {reply_topic} is not a JSON object") from None
        if reply_topic.endswith("/rejected"):
            raise IssuerError(
                f"{operation} rejected: {body.get('statusCode')} {body.get('errorCode')}: "
                f"{body.get('errorMessage')}"
            )
        return body
