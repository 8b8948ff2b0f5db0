"""Issue 17: hostile sensors against the broker in process (real sockets, the real session and codec). The
live daemon's hostile-client suite grows beside it as the issue's items are done."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gatewayd.core.mqtt.packets import MQTT_5, MQTT_311, Connack, Connect
from gatewayd.core.mqtt.topics import Policy, identity_problem, policy_variables
from gatewayd.service.broker import Broker

from .test_broker_failures import RawSensor, _config, _serve

HOSTILE_IDS = ["s1/x", "+", "#", "sensors/#", "a${iot:ClientId}", "${", "bad\nline", "nul\x00", "x" * 129]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_hostile_client_ids_are_refused_before_any_session_exists(tmp_path: Path, version: int) -> None:
    """Items 4 and 5: '${' raised TemplateError after the session was stored (no CONNACK, a leaked session);
    '/' and wildcards widened or escaped policy rules. Refused now with 0x85 (3.1.1: 2), nothing stored."""
    broker = Broker(_config(tmp_path), None)

    async def body(port: int) -> None:
        for client_id in HOSTILE_IDS:
            sensor = await asyncio.to_thread(RawSensor, port, version)
            sensor.send(Connect(client_id, version, clean_start=False))
            answers = await asyncio.to_thread(sensor.read_until, 2)
            if "\x00" in client_id:  # U+0000 makes the CONNECT malformed: closed without CONNACK (1.5.4)
                assert answers == [] and sensor.closed
            else:
                expected = 2 if version == MQTT_311 else 0x85
                assert len(answers) == 1 and sensor.closed, (client_id, answers)  # closed after the refusal
                assert isinstance(answers[0], Connack) and answers[0].reason_code == expected, client_id
            sensor.close()
            assert client_id not in broker.sessions and client_id not in broker.clients
        good = await asyncio.to_thread(RawSensor, port, version)
        good.send(Connect("s1", version))
        (answer,) = await asyncio.to_thread(good.read_until, 1)
        assert answer == Connack(False, 0) or (isinstance(answer, Connack) and answer.reason_code == 0)
        good.close()

    asyncio.run(_serve(broker, body))


def test_identity_rules() -> None:
    for bad in HOSTILE_IDS:
        assert identity_problem(bad) is not None, bad
    for good in ("s1", "sensor-7f3a", "温度计", "$x", "a.b:c@d", "x" * 128, ""):
        assert identity_problem(good) is None, good


def test_deny_rules_fail_closed_and_allow_rules_drop() -> None:
    """Item 5: the rule-dropping protection dropped deny rules too (client id s1/x escaped a deny rule)."""
    policy = Policy(
        publish=("sensors/#",),
        subscribe=("commands/${iot:ClientId}/#",),
        deny_publish=("sensors/${iot:ClientId}/config",),
        deny_subscribe=("commands/${iot:Certificate.Subject.CommonName}/secret",),
    )
    bound = policy.bind(policy_variables("s1/x", "cn+", "gw"))
    assert not bound.may_publish("sensors/s1/x/config") and not bound.may_publish("sensors/other/t")
    assert not bound.may_subscribe("commands/s1/x/#") and not bound.may_subscribe("commands/other")
    fine = policy.bind(policy_variables("s1", "s1", "gw"))
    assert fine.may_publish("sensors/s1/t") and not fine.may_publish("sensors/s1/config")
    assert fine.may_subscribe("commands/s1/status") and not fine.may_subscribe("commands/s1/secret")
