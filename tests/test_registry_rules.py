"""The registry's transition table: every allowed and refused transition, REVOKED final, refusals say why."""

from __future__ import annotations

import itertools

import pytest

from gatewayd.core.errors import GatewaydError, TransitionRefused
from gatewayd.core.registry import (
    TRANSITIONS,
    Action,
    CaStatus,
    Status,
    admits,
    deletable,
    transition,
    update_action,
)

ALLOWED = {
    (Status.ACTIVE, Action.ACTIVATE): Status.ACTIVE,
    (Status.INACTIVE, Action.ACTIVATE): Status.ACTIVE,
    (Status.PENDING_ACTIVATION, Action.ACTIVATE): Status.ACTIVE,
    (Status.REGISTER_INACTIVE, Action.ACTIVATE): Status.ACTIVE,
    (Status.ACTIVE, Action.DEACTIVATE): Status.INACTIVE,
    (Status.INACTIVE, Action.DEACTIVATE): Status.INACTIVE,
    (Status.PENDING_ACTIVATION, Action.DEACTIVATE): Status.INACTIVE,
    (Status.REGISTER_INACTIVE, Action.DEACTIVATE): Status.INACTIVE,
    (Status.ACTIVE, Action.REVOKE): Status.REVOKED,
    (Status.INACTIVE, Action.REVOKE): Status.REVOKED,
    (Status.PENDING_ACTIVATION, Action.REVOKE): Status.REVOKED,
    (Status.REGISTER_INACTIVE, Action.REVOKE): Status.REVOKED,
    (Status.REVOKED, Action.REVOKE): Status.REVOKED,
    (Status.INACTIVE, Action.TRANSFER): Status.PENDING_TRANSFER,
    (Status.PENDING_TRANSFER, Action.CANCEL_TRANSFER): Status.INACTIVE,
    (Status.PENDING_TRANSFER, Action.TRANSFER_REJECTED): Status.INACTIVE,
    (Status.PENDING_TRANSFER, Action.TRANSFER_ACCEPTED): None,
}


def test_the_table_is_exactly_the_documented_one() -> None:
    assert TRANSITIONS == ALLOWED


@pytest.mark.parametrize(("status", "action"), list(itertools.product(Status, Action)))
def test_every_pair_is_allowed_or_refused_with_a_reason(status: Status, action: Action) -> None:
    if (status, action) in ALLOWED:
        assert transition("c1", status, action) == ALLOWED[(status, action)]
        return
    with pytest.raises(TransitionRefused) as err:
        transition("c1", status, action)
    assert err.value.certificate_id == "c1" and err.value.status is status and str(err.value)


def test_revoked_is_final() -> None:
    for action in Action:
        if action is Action.REVOKE:
            continue
        with pytest.raises(TransitionRefused, match="REVOKED, which is final"):
            transition("c", Status.REVOKED, action)


def test_specific_reasons() -> None:
    with pytest.raises(
        TransitionRefused, match="ACTIVE certificate cannot be transferred: set it INACTIVE first"
    ):
        transition("c", Status.ACTIVE, Action.TRANSFER)
    with pytest.raises(TransitionRefused, match="being transferred"):
        transition("c", Status.PENDING_TRANSFER, Action.ACTIVATE)
    with pytest.raises(TransitionRefused, match="no transfer to settle"):
        transition("c", Status.INACTIVE, Action.CANCEL_TRANSFER)


def test_update_certificate_new_status() -> None:
    assert update_action("ACTIVE") is Action.ACTIVATE
    assert update_action("REVOKED") is Action.REVOKE
    for internal in ("PENDING_TRANSFER", "PENDING_ACTIVATION", "REGISTER_INACTIVE", "active", "GONE"):
        with pytest.raises(GatewaydError, match="'newStatus' must be one of ACTIVE, INACTIVE, REVOKED"):
            update_action(internal)


def test_delete_and_admission_rules() -> None:
    assert "cannot be deleted" in (deletable(Status.ACTIVE) or "")
    assert deletable(Status.INACTIVE) is None and deletable(Status.REVOKED) is None
    assert deletable(Status.PENDING_TRANSFER) is not None
    assert admits(Status.ACTIVE, None) and admits(Status.ACTIVE, CaStatus.ACTIVE)
    assert not admits(Status.ACTIVE, CaStatus.INACTIVE)
    assert not any(admits(s, None) for s in Status if s is not Status.ACTIVE)
