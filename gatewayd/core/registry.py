"""The sensor certificate registry's rules, as AWS IoT's: statuses and the one table of allowed transitions.

Sources: AWS IoT API Reference (UpdateCertificate, TransferCertificate, AcceptCertificateTransfer,
RejectCertificateTransfer, CancelCertificateTransfer, DeleteCertificate, UpdateCACertificate). REVOKED is
final. A refused transition changes nothing and says why.
"""

from __future__ import annotations

from enum import StrEnum

from gatewayd.core.errors import AwsError, GatewaydError, TransitionRefused


class Status(StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    REVOKED = "REVOKED"
    PENDING_TRANSFER = "PENDING_TRANSFER"
    PENDING_ACTIVATION = "PENDING_ACTIVATION"
    REGISTER_INACTIVE = "REGISTER_INACTIVE"


class CaStatus(StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class AutoRegistration(StrEnum):
    ENABLE = "ENABLE"
    DISABLE = "DISABLE"


class Action(StrEnum):
    ACTIVATE = "activate"  # update-certificate --new-status ACTIVE
    DEACTIVATE = "deactivate"  # update-certificate --new-status INACTIVE
    REVOKE = "revoke"  # update-certificate --new-status REVOKED
    TRANSFER = "transfer"  # transfer-certificate (source)
    CANCEL_TRANSFER = "cancel-transfer"  # cancel-certificate-transfer (source)
    TRANSFER_REJECTED = "transfer-rejected"  # the target's rejection, applied at the source
    TRANSFER_ACCEPTED = "transfer-accepted"  # the target's acceptance, applied at the source: it leaves


_S = Status
_A = Action
# (current status, action) -> new status; None means the certificate leaves this registry (transferred away).
TRANSITIONS: dict[tuple[Status, Action], Status | None] = {
    (_S.ACTIVE, _A.ACTIVATE): _S.ACTIVE,  # UpdateCertificate is idempotent
    (_S.INACTIVE, _A.ACTIVATE): _S.ACTIVE,
    (_S.PENDING_ACTIVATION, _A.ACTIVATE): _S.ACTIVE,
    (_S.REGISTER_INACTIVE, _A.ACTIVATE): _S.ACTIVE,
    (_S.ACTIVE, _A.DEACTIVATE): _S.INACTIVE,
    (_S.INACTIVE, _A.DEACTIVATE): _S.INACTIVE,
    (_S.PENDING_ACTIVATION, _A.DEACTIVATE): _S.INACTIVE,
    (_S.REGISTER_INACTIVE, _A.DEACTIVATE): _S.INACTIVE,
    (_S.ACTIVE, _A.REVOKE): _S.REVOKED,
    (_S.INACTIVE, _A.REVOKE): _S.REVOKED,
    (_S.PENDING_ACTIVATION, _A.REVOKE): _S.REVOKED,
    (_S.REGISTER_INACTIVE, _A.REVOKE): _S.REVOKED,
    (_S.REVOKED, _A.REVOKE): _S.REVOKED,
    (_S.INACTIVE, _A.TRANSFER): _S.PENDING_TRANSFER,
    (_S.PENDING_TRANSFER, _A.CANCEL_TRANSFER): _S.INACTIVE,
    (_S.PENDING_TRANSFER, _A.TRANSFER_REJECTED): _S.INACTIVE,
    (_S.PENDING_TRANSFER, _A.TRANSFER_ACCEPTED): None,
}


def _why(status: Status, action: Action) -> str:
    if status is Status.REVOKED:
        return "the certificate is REVOKED, which is final"
    if status is Status.PENDING_TRANSFER:
        return "the certificate is being transferred: cancel the transfer (or let the target reject it) first"
    if action is Action.TRANSFER and status is Status.ACTIVE:
        return "an ACTIVE certificate cannot be transferred: set it INACTIVE first"
    if action is Action.TRANSFER:
        return f"a {status.value} certificate cannot be transferred; only an INACTIVE one can"
    if action in (Action.CANCEL_TRANSFER, Action.TRANSFER_REJECTED, Action.TRANSFER_ACCEPTED):
        return f"the certificate is {status.value}, not PENDING_TRANSFER: there is no transfer to settle"
    return f"{action.value} is not allowed from {status.value}"


def transition(certificate_id: str, status: Status, action: Action) -> Status | None:
    """The status after `action`, or TransitionRefused saying why (and nothing changes)."""
    key = (status, action)
    if key not in TRANSITIONS:
        raise TransitionRefused(certificate_id, status, action, _why(status, action))
    return TRANSITIONS[key]


UPDATE_ACTIONS = {
    Status.ACTIVE: Action.ACTIVATE,
    Status.INACTIVE: Action.DEACTIVATE,
    Status.REVOKED: Action.REVOKE,
}


def update_action(new_status: str) -> Action:
    """update-certificate --new-status: ACTIVE, INACTIVE or REVOKED (AWS refuses the internal statuses)."""
    try:
        return UPDATE_ACTIONS[Status(new_status)]
    except (ValueError, KeyError):
        allowed = ", ".join(s.value for s in UPDATE_ACTIONS)
        error = GatewaydError(f"'newStatus' must be one of {allowed}; {new_status} is not settable")
        error.code = AwsError.INVALID_REQUEST.value
        raise error from None


def deletable(status: Status) -> str | None:
    """Why a certificate cannot be deleted now, or None (DeleteCertificate refuses ACTIVE ones)."""
    if status is Status.ACTIVE:
        return "an ACTIVE certificate cannot be deleted: set it INACTIVE or REVOKED first"
    if status is Status.PENDING_TRANSFER:
        return "the certificate is being transferred: cancel the transfer first"
    return None


def admits(status: Status, ca_status: CaStatus | None) -> bool:
    """The listener admits a certificate only when it is ACTIVE and its CA, if registered, is ACTIVE."""
    return status is Status.ACTIVE and ca_status in (None, CaStatus.ACTIVE)
