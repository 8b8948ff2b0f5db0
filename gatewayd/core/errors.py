"""The one exception tree of gatewayd: every error the project raises on purpose is defined here and
derives from GatewaydError. Messages name arguments as the control socket's JSON keys (AWS's API member
names, quoted: 'newStatus'); only the command line (cli/) words them as its flags (core/commands.py,
`cli_wording`).

    GatewaydError
    ├── ConfigError                     the configuration (every problem found, not just the first)
    ├── ControlError                    a control-socket request
    │   └── DaemonUnreachable
    ├── UsageError, EnvironmentProblem  gatewayctl's command line, its environment
    ├── TPMError                        the TPM
    │   └── TPMUnavailable
    ├── IdentityError                   the gateway's key and certificates (stores/identity.py)
    │   └── StoreLocked
    ├── CertificateError                an unusable certificate or PEM file
    ├── TrustError                      the CA bundle the uplink verifies AWS IoT with
    ├── IssuerError, RenewalFailed, RenewalStateError, RenewalRefused   renewal
    ├── RegistryError, TransitionRefused    the sensor certificate registry (with AWS's exception name)
    ├── SpillError                      the spool on flash
    │   └── SpillFull
    ├── UplinkError                     the uplink process
    │   └── UplinkRefused
    ├── ProtocolError, ConnectionStateError, FrameError   MQTT and the uplink's pipe
    ├── IllegalTransition               a state machine asked to do what its state forbids (our bug)
    ├── TemplateError                   a topic template
    └── UdevUnavailable                 no udev here
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: core/errors.py imports nothing of gatewayd at run time
    from gatewayd.core.registry import Action, Status
    from gatewayd.core.renewal import Event, Step


class GatewaydError(Exception):
    """Root of every error gatewayd raises on purpose.

    `code`: AWS's exception name where the error mirrors an AWS IoT one (the registry's commands, which
    gatewayctl prints as the AWS CLI does); empty otherwise."""

    code = ""


# ---------------------------------------------------------------------- configuration and control


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the configuration, located by file and dotted key."""

    file: str
    key: str  # dotted key ("upstream.port"); empty when the problem concerns the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"


class ConfigError(GatewaydError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class ControlError(GatewaydError):
    """A control-socket request failed (bad request, refused, or the daemon is unreachable); `code` is the
    daemon's error name when it gave one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class DaemonUnreachable(ControlError):
    """No daemon listens on the control socket (it is not running)."""


class UsageError(GatewaydError):
    """A command line that parsed but cannot run (exit 252, as the AWS CLI's parameter errors)."""


class EnvironmentProblem(GatewaydError):
    """The configuration gatewayctl needs is unusable (exit 253 for registry commands, as the AWS CLI's)."""


# ---------------------------------------------------------------------- the gateway's identity


class TPMError(GatewaydError):
    """A TPM operation failed; the message names the operation and the TPM's response."""


class TPMUnavailable(TPMError):
    """The TPM cannot be reached through the configured TCTI (absent device, resource manager down)."""


class IdentityError(GatewaydError):
    """An identity operation was refused or failed; nothing was changed."""


class StoreLocked(IdentityError):
    """Another process (normally the running daemon) holds the state directory."""


class CertificateError(GatewaydError):
    """A certificate or PEM file is unusable; the message says why in one line."""


class TrustError(GatewaydError):
    """The trust bundle cannot be built or changed; the message says which root and what to do."""


class IssuerError(GatewaydError):
    """The issuer did not deliver a certificate; the message says why in one line."""


class RenewalFailed(GatewaydError):
    """A renewal attempt failed; it is tried again later (renewal.retry_*)."""


class RenewalStateError(GatewaydError):
    """The renewal state file exists but cannot be read; the message is one line."""


class RenewalRefused(GatewaydError):
    """A renewal event that is not possible in the current step (core/renewal.py)."""

    def __init__(self, step: Step, event: Event) -> None:
        super().__init__(f"renewal: {event.value} is not possible in step {step.value}")
        self.step = step
        self.event = event


# ---------------------------------------------------------------------- the sensor certificate registry


class AwsError(StrEnum):
    """The exception names AWS IoT's certificate operations answer with (botocore's iot service model);
    scripts written for the AWS CLI branch on them."""

    INVALID_REQUEST = "InvalidRequestException"
    NOT_FOUND = "ResourceNotFoundException"
    ALREADY_EXISTS = "ResourceAlreadyExistsException"
    CERTIFICATE_STATE = "CertificateStateException"
    CERTIFICATE_VALIDATION = "CertificateValidationException"
    REGISTRATION_CODE = "RegistrationCodeValidationException"
    TRANSFER_COMPLETED = "TransferAlreadyCompletedException"
    DELETE_CONFLICT = "DeleteConflictException"


class RegistryError(GatewaydError):
    """A registry request was refused; nothing was written. The message is one line; `code` the AWS
    exception name AWS IoT answers the same refusal with (core/registry.py:AwsError)."""

    def __init__(self, message: str, code: AwsError = AwsError.INVALID_REQUEST) -> None:
        super().__init__(message)
        self.code = code.value


class TransitionRefused(GatewaydError):
    """A certificate status change AWS IoT would refuse (core/registry.py's transition table)."""

    code = AwsError.CERTIFICATE_STATE.value

    def __init__(self, certificate_id: str, status: Status, action: Action, reason: str) -> None:
        super().__init__(reason)
        self.certificate_id = certificate_id
        self.status = status
        self.action = action


# ---------------------------------------------------------------------- messages on their way


class SpillError(GatewaydError):
    """The spool on flash cannot be read or written."""


class SpillFull(SpillError):
    """Readings that did not fit; the caller must not acknowledge them to their sensor."""


class UplinkError(GatewaydError):
    """The uplink could not take or send a message."""


class UplinkRefused(UplinkError):
    """A message AWS IoT would refuse (larger than upstream.quota.max_message_bytes): never sent."""


class ProtocolError(GatewaydError):
    """The peer broke the MQTT protocol; `reason` is the 5.0 reason code to close the connection with."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionStateError(GatewaydError):
    """The broker answered a connection in a state where the answer means nothing: our bug, not the peer's."""


class FrameError(GatewaydError, ValueError):
    """A malformed frame on the pipe between the daemon and a helper process (core/ipc.py)."""


class IllegalTransition(GatewaydError):
    """A state machine was asked for a transition its state does not allow (core/uplinkstate.py)."""


class TemplateError(GatewaydError, ValueError):
    """A topic template is malformed (core/templates.py)."""


class UdevUnavailable(GatewaydError):
    """No udev here (no /run/udev, no netlink permission, pyudev or libudev missing)."""
