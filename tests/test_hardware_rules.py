"""The pure parts of issue 9: serial rules and records, the TPM device a config watches (no I/O)."""

from __future__ import annotations

import tomllib

import pytest

from gatewayd.adapters.udev import UdevDevice
from gatewayd.core.config import validate
from gatewayd.core.errors import ConfigError
from gatewayd.service.downstream.serial import Port, SerialSensors, matches
from gatewayd.service.hardware import tpm_device

BASE = """
[gateway]
thing_name = "gw"
[upstream]
endpoint = "x-ats.iot.eu-west-1.amazonaws.com"
"""


def config(extra: str) -> object:
    return validate(tomllib.loads(BASE + extra), {}, "t.toml")


def problems(extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        config(extra)
    return str(info.value)


@pytest.mark.parametrize(
    ("tcti", "setting", "expected"),
    [
        ("device:/dev/tpmrm0", "auto", "/dev/tpmrm0"),
        ("device:/dev/tpm0", "auto", "/dev/tpm0"),
        ("device", "auto", "/dev/tpmrm0"),
        ("tabrmd:bus_type=system", "auto", ""),
        ("swtpm:port=2321", "auto", ""),
        ("swtpm:port=2321", "/dev/tpmrm1", "/dev/tpmrm1"),
        ("device:/dev/tpmrm0", "", ""),
    ],
)
def test_the_tpm_device_watched(tcti: str, setting: str, expected: str) -> None:
    c = config(f'[identity]\ntcti = "{tcti}"\ntpm_device = "{setting}"\n')
    assert tpm_device(c) == expected  # type: ignore[arg-type]


def test_file_keys_watch_no_tpm() -> None:
    c = config('[identity]\nkey_backend = "file"\n')
    assert tpm_device(c) == ""  # type: ignore[arg-type]


def test_serial_rules_are_checked() -> None:
    assert "must be an absolute path" in problems('[identity]\ntpm_device = "tpmrm0"\n')
    text = problems('[[downstream.serial]]\nmatch = {}\ntopic = "a/+"\nclient_id = "x"\nbaudrate = 1000\n')
    assert "serial[0].match: must name at least one udev property" in text
    assert "serial[0].topic: must be a topic name without wildcards" in text
    assert "serial[0].baudrate: must be one of 1200" in text
    both = (
        '[[downstream.serial]]\nmatch = { ID_SERIAL = "a" }\ntopic = "t"\nclient_id = "x"\ncertificate_id = "'
    )
    assert "set exactly one of client_id and certificate_id" in problems(both + 64 * "a" + '"\n')
    neither = '[[downstream.serial]]\nmatch = { ID_SERIAL = "a" }\ntopic = "t"\n'
    assert "set exactly one of client_id and certificate_id" in problems(neither)
    assert "64 lower-case hex digits" in problems(neither + 'certificate_id = "ABC"\n')
    assert "not a udev property name" in problems(
        '[[downstream.serial]]\nmatch = { "id serial" = "a" }\ntopic = "t"\nclient_id = "x"\n'
    )


def _sensors(extra: str) -> tuple[SerialSensors, list[tuple[str, str, str, bytes, int]]]:
    c = config(extra)
    published: list[tuple[str, str, str, bytes, int]] = []

    def publish(cid: str, cn: str, topic: str, payload: bytes, qos: int) -> int | None:
        published.append((cid, cn, topic, payload, qos))
        return None

    async def room() -> None:
        return None

    return SerialSensors(c, publish, lambda cid: ("", None), room, lambda: True), published  # type: ignore[arg-type]


RULE = '[[downstream.serial]]\nmatch = { ID_VENDOR_ID = "0403" }\ntopic = "sensors/${iot:ClientId}/t"\n'


def test_rules_match_every_property_of_a_tty_only() -> None:
    sensors, _ = _sensors(RULE + 'client_id = "s"\n')
    rule = sensors.rules[0]
    tty = UdevDevice("add", "tty", "ttyUSB0", "/sys/x", {"ID_VENDOR_ID": "0403", "DEVNAME": "/dev/ttyUSB0"})
    assert matches(rule, tty)
    assert not matches(rule, UdevDevice("add", "usb", "1-1", "/sys/y", {"ID_VENDOR_ID": "0403"}))
    assert not matches(rule, UdevDevice("add", "tty", "ttyUSB1", "/sys/z", {"ID_VENDOR_ID": "1a86"}))


@pytest.mark.parametrize("fmt", ["json", "raw"])
def test_records_are_split_on_newlines_and_bad_ones_dropped(fmt: str) -> None:
    sensors, published = _sensors(RULE + f'client_id = "s"\nformat = "{fmt}"\nmax_record_bytes = 16\n')
    port = Port("/dev/ttyUSB0", sensors.rules[0], 0, -1, "s")
    chunks = [b'{"a": 1}\r\n', b"\n", b'{"b"', b": 2}\n", b"x" * 20, b"y" * 20, b'\n{"c": 3}\n', b"nope\n"]
    for chunk in chunks:
        sensors._feed(port, chunk)
    payloads = [p[3] for p in published]
    if fmt == "json":
        assert payloads == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
        assert port.dropped == 2  # the 40-byte line and "nope"
    else:
        assert payloads == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}', b"nope"]
        assert port.dropped == 1
    assert {p[2] for p in published} == {"sensors/s/t"} and {p[4] for p in published} == {1}
    assert port.buffer == b"" and not port.discarding


def test_an_oversized_record_is_skipped_to_its_newline_across_reads() -> None:
    sensors, published = _sensors(RULE + 'client_id = "s"\nformat = "raw"\nmax_record_bytes = 16\n')
    port = Port("/dev/ttyUSB0", sensors.rules[0], 0, -1, "s")
    for chunk in [b"a" * 17, b"still the same record", b" end\nnext\n"]:
        sensors._feed(port, chunk)
    assert [p[3] for p in published] == [b"next"] and port.dropped == 1


def test_a_refused_certificate_drops_records() -> None:
    sensors, published = _sensors(RULE.replace("${iot:ClientId}", "x") + f'certificate_id = "{64 * "b"}"\n')
    sensors.identify = lambda cid: ("probe", "certificate bbbb is INACTIVE")
    port = Port("/dev/ttyUSB0", sensors.rules[0], 0, -1, "")
    sensors._identify(port)
    sensors._feed(port, b'{"v": 1}\n')
    assert published == [] and port.dropped == 1 and port.client_id == "probe"
    sensors.identify = lambda cid: ("probe", None)
    sensors._identify(port)
    sensors._feed(port, b'{"v": 2}\n')
    assert [(p[0], p[1], p[3]) for p in published] == [("probe", "probe", b'{"v": 2}')]
