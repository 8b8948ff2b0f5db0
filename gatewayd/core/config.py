"""Configuration schema and validation (pure: takes already-parsed TOML documents).

The schema is a tree of frozen dataclasses. Each field carries a `Spec` (default, bounds, whether it can
change on SIGHUP, its documentation). `validate()` walks a merged document against the tree and reports
*every* problem at once as `FILE:section.key: problem`, naming the file that set the offending value.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

from gatewayd.core.duration import Duration, parse_duration
from gatewayd.core.errors import ConfigError, ConfigProblem, TemplateError
from gatewayd.core.keys import KEY_BACKENDS, KEY_TYPES
from gatewayd.core.mqtt.topics import TopicMap, check_policy_filters
from gatewayd.core.renewal import RenewBefore, RenewBeforeText
from gatewayd.core.templates import expand
from gatewayd.core.trust import FILE_MODES, MODES

# Dotted key path -> file that set it (the last file wins, as for the value itself).
Origins = Mapping[tuple[str, ...], str]
Check = Callable[[Any], str | None]  # returns a problem text, or None when the value is fine


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Spec:
    doc: str
    live: bool = False  # applied on SIGHUP without a restart
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Check | None = None


def opt(default: Any, doc: str, **kw: Any) -> Any:
    """A config field: its default (or REQUIRED) and its Spec."""
    return field(default=default, metadata={"spec": Spec(doc=doc, **kw)})


# ---------------------------------------------------------------- value checks

# AWS IoT thing names: 1-128 characters of [a-zA-Z0-9:_-] (AWS IoT API reference, CreateThing).
_THING_NAME = re.compile(r"[A-Za-z0-9:_-]{1,128}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_thing_name(value: str) -> str | None:
    if _THING_NAME.fullmatch(value):
        return None
    return "must be 1-128 characters of letters, digits, ':', '_' or '-' (AWS IoT thing name rules)"


def check_hostname(value: str) -> str | None:
    labels = value.rstrip(".").split(".")
    if len(value) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return f"{value!r} is not a valid DNS host name"


def check_absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def check_optional_path(value: str) -> str | None:
    return None if value == "" or value.startswith("/") else "must be an absolute path (or empty)"


def check_ip_address(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def check_utc_time(value: str) -> str | None:
    try:
        parse_utc(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_utc(value: str) -> dt.datetime:
    """A UTC time written YYYY-MM-DDTHH:MM:SSZ."""
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"{value!r} is not a UTC time like 2049-12-31T23:59:59Z") from None


def check_certificate_ids(values: tuple[str, ...]) -> str | None:
    for value in values:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            return f"{value!r} is not a certificate id (64 lowercase hex digits)"
    return None


def check_topic_template(value: str) -> str | None:
    try:
        expand(value, {"gateway:ThingName": "x"})
    except TemplateError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- the schema


@dataclass(frozen=True)
class GatewaySection:
    thing_name: str = opt(
        REQUIRED,
        "This gateway's AWS IoT thing name; also its MQTT client id upstream.",
        check=check_thing_name,
    )
    state_dir: str = opt(
        "/var/lib/gatewayd",
        "Directory for the gateway's persistent state (identity, registry, spool). Created 0700.",
        check=check_absolute_path,
    )
    control_socket: str = opt(
        "/run/gatewayd/control.sock",
        "Unix socket on which the daemon answers gatewayctl.",
        check=check_absolute_path,
    )
    control_group: str = opt(
        "gatewayd",
        "Group whose members may use the control socket, besides root and gatewayd's own user.",
    )


@dataclass(frozen=True)
class LoggingSection:
    level: str = opt(
        "info",
        "Lowest level logged: debug, info, warning or error.",
        live=True,
        choices=("debug", "info", "warning", "error"),
    )


@dataclass(frozen=True)
class QuotaSection:
    publishes_per_second: int = opt(
        100, "Most publishes per second on the uplink connection (AWS IoT Core: 100).", minimum=1
    )
    bytes_per_second: int = opt(
        524288, "Most payload bytes per second on the uplink connection (AWS IoT Core: 512 KiB).", minimum=1
    )
    max_message_bytes: int = opt(
        131072,
        "Largest payload forwarded (AWS IoT Core: 128 KiB); a sensor's larger message is refused with "
        "reason 0x97 (quota exceeded).",
        minimum=1,
    )
    max_inflight: int = opt(
        100, "Most unacknowledged QoS 1 publishes on the uplink (AWS IoT Core: 100).", minimum=1
    )
    max_subscriptions: int = opt(
        50,
        "Most upstream subscriptions (AWS IoT Core: 50 per connection); a sensor subscription that would "
        "need one more upstream filter is refused with reason 0x97.",
        minimum=1,
    )
    filters_per_subscribe: int = opt(
        8, "Most topic filters in one SUBSCRIBE to AWS IoT (AWS IoT Core: 8).", minimum=1
    )


@dataclass(frozen=True)
class UpstreamSection:
    endpoint: str = opt(
        REQUIRED,
        "Your AWS IoT Core device data endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS).",
        check=check_hostname,
    )
    port: int = opt(
        8883, "TCP port of the endpoint: 8883, or 443 (MQTT with ALPN).", minimum=1, maximum=65535
    )
    validation_mode: str = opt(
        "rsa",
        "Which root CAs authenticate the endpoint: rsa (Amazon Root CA 1 and 2), ecc (3 and 4), all (1-4), "
        "legacy (upstream.ca_file, for pre-ATS endpoints AWS no longer supports), custom (upstream.ca_file).",
        choices=MODES,
    )
    ca_file: str = opt(
        "",
        "PEM file of the root CA(s) trusted in legacy and custom modes; unused otherwise.",
        check=check_optional_path,
    )
    system_ca_bundle: str = opt(
        "/etc/ssl/certs/ca-certificates.crt",
        "The system's CA bundle, from which the Amazon roots are taken by pinned fingerprint.",
        check=check_absolute_path,
    )
    connect_address: str = opt(
        "",
        "Connect to this IP address instead of resolving the endpoint; TLS still verifies the endpoint name. "
        "Empty: resolve the endpoint.",
        check=check_ip_address,
    )
    alpn: str = opt(
        "auto",
        'TLS ALPN: "auto" sends x-amzn-mqtt-ca on port 443 only (as AWS requires there), "x-amzn-mqtt-ca" '
        'always, "none" never.',
        choices=("auto", "x-amzn-mqtt-ca", "none"),
    )
    keepalive: int = opt(60, "MQTT keepalive in seconds (AWS IoT accepts 30-1200).", minimum=30, maximum=1200)
    reconnect_max_delay: int = opt(
        120,
        "Upper bound in seconds of the reconnect backoff (exponential, full jitter, at least 1 s).",
        minimum=1,
    )
    root_expiry_warning_days: int = opt(
        180, "Warn this many days before a trusted root CA expires.", live=True, minimum=1
    )
    quota: QuotaSection = field(default_factory=QuotaSection)


@dataclass(frozen=True)
class IdentitySection:
    key_backend: str = opt(
        "tpm",
        'Where the private key lives: "tpm" (made inside the TPM, never exportable) or "file" (a software '
        "key for gateways without a TPM; warned about at every start).",
        choices=KEY_BACKENDS,
    )
    key_type: str = opt(
        "ecc-p256",
        "Type of new keys: ecc-p256, ecc-p384, rsa-2048 or rsa-3072.",
        live=True,
        choices=KEY_TYPES,
    )
    tcti: str = opt(
        "device:/dev/tpmrm0",
        "How to reach the TPM (a TCTI string): the kernel resource manager on a Pi; tabrmd:... for abrmd.",
    )
    tpm_device: str = opt(
        "auto",
        'The TPM device node whose presence udev reports: while it is absent the uplink waits ("waiting '
        'for TPM") and resumes the moment udev announces it; when it disappears the uplink stops cleanly. '
        '"auto": the path of a device: TCTI (/dev/tpmrm0 by default), none for other TCTIs; "" watches '
        "nothing.",
        check=lambda v: None if v == "auto" else check_optional_path(v),
    )
    parent_handle: int = opt(
        0x81000001,
        "Persistent handle of the storage root key (SRK) new keys are created under; created from the "
        "standard ECC P-256 template if absent.",
        minimum=0x81000000,
        maximum=0x817FFFFF,
    )
    common_name: str = opt("", "Subject CN of CSRs; empty means the thing name.", live=True)
    organization: str = opt("", "Subject O of CSRs; empty means none.", live=True)
    issuer_ca_file: str = opt(
        "",
        "PEM file of the CA(s) that issue the gateway's certificate; when set, an installed certificate must "
        "chain to it. Empty: no such check.",
        live=True,
        check=check_optional_path,
    )
    keep_versions: int = opt(
        3, "How many certificate versions to keep on disk (at least 2).", live=True, minimum=2
    )


def check_listener_address(value: str) -> str | None:
    if value.startswith("unix:"):
        return None if value[5:].startswith("/") else "a unix socket address is unix:/absolute/path"
    return check_ip_address(value) if value else "must not be empty"


def _loopback(address: str) -> bool:
    return address.startswith("unix:") or ipaddress.ip_address(address).is_loopback


def check_listeners(listeners: tuple[Any, ...]) -> str | None:
    seen: set[tuple[str, int]] = set()
    for i, lst in enumerate(listeners):
        where = f"listener[{i}]"
        key = (lst.address, 0 if lst.address.startswith("unix:") else lst.port)
        if key in seen:
            return f"{where}: {lst.address} port {lst.port} is configured twice"
        seen.add(key)
        if lst.require_client_cert and not lst.tls:
            return f"{where}: require_client_cert needs tls = true"
        if not lst.tls and not lst.allow_insecure and not _loopback(lst.address):
            return (
                f"{where}: plain MQTT on {lst.address} would expose sensors' traffic; "
                "use tls, a loopback address, or allow_insecure = true"
            )
        if lst.tls and not lst.require_client_cert and not lst.allow_insecure and not _loopback(lst.address):
            return (
                f"{where}: without client certificates on {lst.address}, sensors bypass the registry; "
                "use require_client_cert = true, a loopback address, or allow_insecure = true"
            )
    return None


def check_policy(filters: tuple[str, ...]) -> str | None:
    return check_policy_filters(filters)


def check_upstream_template(value: str) -> str | None:
    try:
        TopicMap.from_template(value, "thing")
    except TemplateError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ListenerSection:
    address: str = opt(
        "0.0.0.0", "IP address to listen on (0.0.0.0 or :: for all), or unix:/path for a unix socket.",
        check=check_listener_address,
    )  # fmt: skip
    port: int = opt(8883, "TCP port; unused for a unix socket.", minimum=1, maximum=65535)
    tls: bool = opt(True, "TLS with a server certificate from the gateway's local CA.")
    require_client_cert: bool = opt(True, "Sensors must present a certificate from a trusted sensor CA.")
    allow_insecure: bool = opt(
        False, "Allow plain MQTT, or TLS without client certificates, on a non-loopback address."
    )


SERIAL_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
_CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")


def check_udev_match(value: tuple[tuple[str, str], ...]) -> str | None:
    if not value:
        return 'must name at least one udev property, e.g. { ID_VENDOR_ID = "0403", ID_MODEL_ID = "6001" }'
    for key, _ in value:
        if not re.fullmatch(r"[A-Z0-9_]{1,64}", key):
            return f"{key!r} is not a udev property name (upper case, digits, underscores)"
    return None


def check_certificate_id(value: str) -> str | None:
    return None if value == "" or _CERTIFICATE_ID.fullmatch(value) else "must be 64 lower-case hex digits"


@dataclass(frozen=True)
class SerialSection:
    match: tuple[tuple[str, str], ...] = opt(
        REQUIRED,
        "udev properties a tty must all have (exact values), e.g. ID_VENDOR_ID, ID_MODEL_ID, ID_SERIAL, "
        "ID_SERIAL_SHORT, ID_PATH; `udevadm info /dev/ttyUSB0` lists a device's.",
        check=check_udev_match,
    )
    client_id: str = opt("", "The sensor identity its records are published as (or certificate_id).")
    certificate_id: str = opt(
        "",
        "A registry certificate id instead of client_id: the sensor is the certificate's CN, admitted only "
        "while the certificate (and its CA) is ACTIVE.",
        check=check_certificate_id,
    )
    topic: str = opt(
        REQUIRED,
        "Topic the records are published to, as that sensor (checked against downstream.policy, then mapped "
        "by forwarding.upstream_topic). ${iot:ClientId} is the sensor's client id.",
        check=lambda v: "must be a topic name without wildcards" if not v or "+" in v or "#" in v else None,
    )
    format: str = opt(
        "json",
        'Records are lines: "json" (each line one JSON value, anything else is dropped) or "raw" (bytes as '
        "they come, without the line end).",
        choices=("json", "raw"),
    )
    max_record_bytes: int = opt(
        4096, "Longest record; a longer line is dropped (logged).", minimum=16, maximum=131072
    )
    qos: int = opt(1, "QoS of the published records (0 or 1).", minimum=0, maximum=1)
    baudrate: int = opt(
        9600, "Line speed: " + ", ".join(map(str, SERIAL_BAUDRATES)) + ".",
        check=lambda v: None if v in SERIAL_BAUDRATES else f"must be one of {', '.join(map(str, SERIAL_BAUDRATES))}",  # noqa: E501
    )  # fmt: skip
    data_bits: int = opt(8, "Data bits, 5 to 8.", minimum=5, maximum=8)
    parity: str = opt("none", "Parity: none, even or odd.", choices=("none", "even", "odd"))
    stop_bits: int = opt(1, "Stop bits, 1 or 2.", minimum=1, maximum=2)


def check_serial_rules(rules: tuple[Any, ...]) -> str | None:
    for i, rule in enumerate(rules):
        if bool(rule.client_id) == bool(rule.certificate_id):
            return f"serial[{i}]: set exactly one of client_id and certificate_id"
    return None


@dataclass(frozen=True)
class PolicySection:
    publish: tuple[str, ...] = opt(
        ("sensors/${iot:ClientId}/#",),
        "Topic filters a sensor may publish to.",
        live=True,
        check=check_policy,
    )
    subscribe: tuple[str, ...] = opt(
        ("commands/${iot:ClientId}/#",),
        "Topic filters a sensor may subscribe to: a subscription is granted when one of these covers it "
        "(and no deny_subscribe filter does); $share/<group>/<filter> is judged on <filter>.",
        live=True,
        check=check_policy,
    )
    deny_publish: tuple[str, ...] = opt(
        (), "Topic filters a sensor may never publish to (deny wins).", live=True, check=check_policy
    )
    deny_subscribe: tuple[str, ...] = opt(
        (),
        "Topic filters a sensor may never subscribe to nor receive, as AWS IoT's iot:Subscribe and "
        "iot:Receive: a subscription these cover is refused; a broader one (#) is granted, and the messages "
        "on topics these match are withheld from it.",
        live=True,
        check=check_policy,
    )


@dataclass(frozen=True)
class DownstreamSection:
    listener: tuple[ListenerSection, ...] = opt(
        (ListenerSection(),), "The listeners for sensors.", check=check_listeners
    )
    auto_activate: bool = opt(
        False,
        "A certificate auto-registered from a CA with auto-registration enabled is ACTIVE at once (admitted, "
        "like AWS JITP) instead of PENDING_ACTIVATION (refused until activated, like AWS JITR).",
        live=True,
    )
    registration_event_topic: str = opt(
        "gatewayd/${gateway:ThingName}/events/certificates/registered",
        "Upstream topic of AWS IoT's just-in-time registration event (a certificate auto-registered, and "
        "each later connection attempt while it is PENDING_ACTIVATION), followed by /<caCertificateId>, as "
        'AWS\'s $aws/events/certificates/registered/<caCertificateId>; "" publishes none upstream (local '
        "subscribers still get it on AWS's topic).",
        live=True,
        check=check_topic_template,
    )
    certificate_not_after: str = opt(
        "2049-12-31T23:59:59Z",
        "Expiry of certificates from create-keys-and-certificate (UTC, YYYY-MM-DDTHH:MM:SSZ), as AWS IoT's.",
        live=True,
        check=check_utc_time,
    )
    transfer_expiry_days: int = opt(
        7, "Days a certificate transfer bundle can be accepted or rejected.", live=True, minimum=1,
        maximum=365,
    )  # fmt: skip
    advertised_name: str = opt(
        "",
        "The host name sensors connect to, as describe-endpoint reports it (endpointAddress); empty: the "
        "host's name as the listener certificate carries it.",
        live=True,
    )
    transfer_peers: tuple[str, ...] = opt(
        (),
        "Peer gateways certificate transfer files are taken from: their local CAs' certificate ids "
        "(`gatewayctl describe-endpoint` on the peer, caCertificateId). Others only with --expect-signer.",
        live=True,
        check=check_certificate_ids,
    )
    client_id_must_match_cn: bool = opt(
        True, "A sensor's MQTT client id must equal its certificate's CN.", live=True
    )
    connect_timeout: int = opt(
        10,
        "Seconds from a new connection's accept to its CONNECT, TLS handshake included; then it is closed.",
        minimum=1,
    )
    max_pending_connections: int = opt(
        256,
        "Connections accepted that have not completed their CONNECT yet (TLS handshake included); more are "
        "closed at once.",
        minimum=1,
    )
    max_pending_per_address: int = opt(
        32,
        "Of those, from one source address (loopback addresses excepted: local processes); more are closed "
        "at once.",
        minimum=1,
    )
    max_connections: int = opt(1000, "Connections at once; more are refused at once.", minimum=1)
    max_packet_size: int = opt(
        131072, "Largest packet accepted from a sensor (bytes).", minimum=128, maximum=268435460
    )
    receive_maximum: int = opt(
        65535,
        "Receive Maximum announced to 5.0 sensors: QoS 1/2 messages one may have unacknowledged (QoS 2 until "
        "PUBCOMP); one more is disconnected with 0x93. The gateway decides at most 100 (or this, if lower) "
        "at once; the rest wait in the socket, however many a sensor sends.",
        minimum=1,
        maximum=65535,
    )
    keepalive_min: int = opt(
        0,
        "5.0 sensors asking for a shorter keepalive (s) get this one, told in CONNACK (Server Keep Alive); "
        "0: none. 3.1.1 sensors always keep their own (nothing can tell them otherwise).",
        minimum=0,
        maximum=65535,
    )
    keepalive_max: int = opt(
        65535,
        "5.0 sensors asking for a longer keepalive (s), or none (0), get this one, told in CONNACK (Server "
        "Keep Alive); 65535: no maximum (AWS IoT uses 1200).",
        minimum=1,
        maximum=65535,
    )
    max_inflight: int = opt(
        20, "QoS 1/2 messages sent to a sensor and not yet acknowledged.", minimum=1, maximum=65535
    )
    max_queued_messages: int = opt(1000, "Messages waiting for a sensor; more are dropped.", minimum=1)
    max_queued_bytes: int = opt(
        1048576, "Payload bytes waiting for a sensor; more are dropped.", minimum=1024
    )
    max_retained_messages: int = opt(1000, "Retained messages kept for local subscribers.", minimum=0)
    max_retained_bytes: int = opt(
        4194304, "Bytes of retained messages (topic + payload) kept in all.", live=True, minimum=0
    )
    max_retained_bytes_per_sensor: int = opt(
        262144, "Bytes of retained messages one sensor may have kept.", live=True, minimum=0
    )
    max_subscriptions_per_sensor: int = opt(
        50,
        "Subscriptions one sensor's session may hold (AWS IoT allows 50 per connection).",
        live=True,
        minimum=1,
    )
    max_upstream_subscriptions_per_sensor: int = opt(
        8,
        "Of those, subscriptions forwarded to AWS IoT (upstream.quota.max_subscriptions are shared by all).",
        live=True,
        minimum=0,
    )
    session_expiry_max: int = opt(
        3600, "Longest time a persistent session outlives its connection (s).", minimum=0
    )
    policy: PolicySection = field(default_factory=PolicySection)
    serial: tuple[SerialSection, ...] = opt(
        (),
        "Serial sensors: a tty udev announces with matching properties is opened and its records are "
        "published as the named sensor.",
        check=check_serial_rules,
    )


def check_duration(value: str) -> str | None:
    try:
        parse_duration(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_sensor_filter(value: str) -> str | None:
    return check_policy((value,))


def check_rule_name(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z0-9_]{1,128}", value):
        return "an AWS IoT rule name is 1-128 letters, digits and underscores"
    return None


@dataclass(frozen=True)
class BatchSection:
    topic: str = opt(
        REQUIRED, "Sensor topic filter whose readings are batched (MQTT wildcards allowed).",
        check=check_sensor_filter,
    )  # fmt: skip
    max_bytes: int = opt(
        65536, "Largest batch message in bytes (at most upstream.quota.max_message_bytes).", minimum=64
    )
    max_delay: Duration = opt(
        Duration("1s"),
        "Longest a reading waits in an open batch before the batch goes.",
        check=check_duration,
    )
    basic_ingest_rule: str = opt(
        "",
        "Publish the batches with AWS IoT Basic Ingest, to $aws/rules/<rule>/<upstream topic>; empty: "
        "to the upstream topic.",
        check=check_rule_name,
    )


@dataclass(frozen=True)
class ForwardingSection:
    upstream_topic: str = opt(
        "${gateway:ThingName}/${topic}",
        "Upstream topic of a sensor's message; must end with ${topic} (the sensor's topic).",
        check=check_upstream_template,
    )
    command_filter: str = opt(
        "commands/#", "Sensor subscriptions within this filter are also subscribed to upstream (mapped).",
        check=lambda v: check_policy((v,)),
    )  # fmt: skip
    batch: tuple[BatchSection, ...] = opt(
        (),
        "Batching rules ([[forwarding.batch]]), opt-in: readings on matching sensor topics that go to the "
        "same upstream topic leave as one JSON batch message. The first matching rule applies.",
    )


@dataclass(frozen=True)
class SpoolSection:
    max_bytes: int = opt(
        67108864,
        "Most payload bytes kept in the spool (state_dir/spool/, segment files) while the uplink cannot "
        "take them; when_full says what happens then.",
        minimum=4096,
    )
    spill_after: Duration = opt(
        Duration("0.5s"),
        "A message AWS IoT has not acknowledged this long is written to the spool and acknowledged to its "
        "sensor (readings AWS IoT acknowledges sooner never touch the disk). 0.5 s is above AWS IoT's usual "
        "PUBACK time (tens to a few hundred ms) and below the 1 s after which common embedded clients "
        "(ESP-IDF's esp-mqtt) send an unacknowledged message again. Messages are spilled at once while the "
        "uplink is down.",
        check=check_duration,
    )
    memory_bytes: int = opt(
        4194304,
        "Most payload bytes of messages waiting in memory (not yet acknowledged by AWS IoT nor spooled); "
        "beyond it the oldest are spooled, beyond twice it sensors' sockets are not read until the spool "
        "catches up.",
        minimum=65536,
    )
    max_age: Duration = opt(
        Duration("7d"),
        "A message older than this is dropped from the spool (counted and logged), QoS 1 included.",
        check=check_duration,
    )
    when_full: str = opt(
        "drop-qos0",
        'What makes room in a full spool: "drop-qos0" (the oldest QoS 0 messages, then QoS 1 publishers are '
        'held back), "hold" (nothing stored is dropped: new QoS 0 messages are, QoS 1 publishers are held '
        'back), "drop-oldest" (the oldest messages whatever their QoS: sensors are never held back; for '
        "data where only the latest matters). Every drop is counted and logged.",
        choices=("drop-qos0", "hold", "drop-oldest"),
    )


def check_renew_before(value: str) -> str | None:
    try:
        RenewBefore.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_argv(value: tuple[str, ...]) -> str | None:
    if value and not value[0].startswith("/"):
        return f"the command must be an absolute path, not {value[0]!r}"
    return None


ISSUERS = ("", "command", "aws-fleet-provisioning")


@dataclass(frozen=True)
class RenewalSection:
    issuer: str = opt(
        "",
        'Who issues renewed certificates: "command" (an executable: CSR on stdin, certificate chain on '
        'stdout), "aws-fleet-provisioning" (AWS IoT CreateCertificateFromCsr + RegisterThing over the '
        'uplink), or "" (no automatic renewal; expiry is only warned about).',
        live=True,
        choices=ISSUERS,
    )
    command: tuple[str, ...] = opt(
        (), "For issuer command: the argv, an absolute path first; run without a shell.", live=True,
        check=check_argv,
    )  # fmt: skip
    issue_timeout: Duration = opt(
        Duration("2m"),
        "How long the issuer may take: the command (then killed), or each answer from AWS IoT.",
        live=True,
        check=check_duration,
    )
    template_name: str = opt(
        "", "For issuer aws-fleet-provisioning: the provisioning template's name.", live=True
    )
    parameters: tuple[tuple[str, str], ...] = opt(
        (), "For issuer aws-fleet-provisioning: the template's parameters (a table of strings).", live=True
    )
    renew_before: RenewBeforeText = opt(
        RenewBeforeText("33%"),
        'How long before expiry to renew: a share of the certificate\'s lifetime ("33%") or a duration '
        '("30d", "12h").',
        live=True,
        check=check_renew_before,
    )
    max_age: Duration = opt(
        Duration("365d"),
        "Also renew when the certificate is older than this (its notBefore), whatever its expiry: AWS IoT's "
        "certificates expire in 2049, so renew_before alone would never rotate the key; 365 days is AWS IoT "
        'Device Defender\'s default certificate age audit threshold. "" turns the age trigger off.',
        live=True,
        check=lambda v: None if v == "" else check_duration(v),
    )
    rotate_key: bool = opt(
        True, "Make a new TPM key for every renewal (else: reuse the current key).", live=True
    )
    retry_interval: Duration = opt(
        Duration("5m"), "First wait after a failed renewal; doubled each time, with jitter.", live=True,
        check=check_duration,
    )  # fmt: skip
    retry_max: Duration = opt(
        Duration("6h"), "Longest wait between renewal attempts.", live=True, check=check_duration
    )
    check_interval: Duration = opt(
        Duration("1h"),
        "How often the gateway checks whether renewal is due.",
        live=True,
        check=check_duration,
    )
    trial_client_id: str = opt(
        "",
        "Client id of the trial connection that proves a new certificate before it goes live. Empty: the "
        "thing name, with the uplink paused for the trial (AWS policies often allow only that id).",
        live=True,
    )
    trial_timeout: Duration = opt(
        Duration("30s"), "How long the trial connection may take.", live=True, check=check_duration
    )
    rollback_window: Duration = opt(
        Duration("10m"),
        "How long a promoted certificate has to connect before the previous one is restored.",
        live=True,
        check=check_duration,
    )
    identity_event_topic: str = opt(
        "gatewayd/${gateway:ThingName}/events/identity",
        "Upstream topic of the identity event published after every change of the gateway's certificate "
        "(promoted, rolled back, abandoned after a failed trial, installed by hand), naming the old and new "
        'certificate ids, so a cloud rule can deactivate the one no longer used; "" publishes none.',
        live=True,
        check=check_topic_template,
    )


@dataclass(frozen=True)
class StatusSection:
    topic: str = opt(
        "gatewayd/${gateway:ThingName}/status",
        "Topic the gateway publishes its own status on (JSON, QoS 1). ${gateway:ThingName} is replaced.",
        live=True,
        check=check_topic_template,
    )
    interval: int = opt(60, "Seconds between status messages; 0 turns them off.", live=True, minimum=0)


def check_sync_source(value: str) -> str | None:
    if value in ("auto", "always") or value.startswith("/"):
        return None
    return 'must be "auto", "always" or the absolute path of a flag file'


@dataclass(frozen=True)
class TimeSection:
    synchronized: str = opt(
        "auto",
        "How the gateway knows its wall clock is right: \"auto\" (systemd-timesyncd's flag, or the kernel's "
        'NTP state as chrony and ntpd set it), "always" (a real-time clock) or the absolute path of a file '
        "that exists while the clock is synchronized. Until it is, no renewal starts from the clock alone "
        "and TLS date failures are reported as a clock problem.",
        live=True,
        check=check_sync_source,
    )


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection
    upstream: UpstreamSection
    identity: IdentitySection = field(default_factory=IdentitySection)
    downstream: DownstreamSection = field(default_factory=DownstreamSection)
    forwarding: ForwardingSection = field(default_factory=ForwardingSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    renewal: RenewalSection = field(default_factory=RenewalSection)
    status: StatusSection = field(default_factory=StatusSection)
    time: TimeSection = field(default_factory=TimeSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# ---------------------------------------------------------------- validation

T = TypeVar("T")


class _Walker:
    def __init__(self, origins: Origins, main_file: str) -> None:
        self.origins = origins
        self.main_file = main_file
        self.problems: list[ConfigProblem] = []
        self.values: dict[str, Any] = {}  # dotted key -> value, for every leaf that is valid on its own

    def where(self, path: tuple[str, ...]) -> str:
        # The file that set this key, else the closest enclosing table's file, else the main file.
        for i in range(len(path), 0, -1):
            if path[:i] in self.origins:
                return self.origins[path[:i]]
        return self.main_file

    def problem(self, path: tuple[str, ...], message: str, file: str | None = None) -> None:
        self.problems.append(ConfigProblem(file or self.where(path), ".".join(path), message))

    def section(self, cls: type[T], doc: Mapping[str, Any], path: tuple[str, ...]) -> T | None:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        for key in doc:
            if key not in known:
                what = "section" if isinstance(doc[key], dict) else "key"
                self.problem((*path, key), f"unknown {what}")
        values: dict[str, Any] = {}
        ok = True
        for f in fields(cls):  # type: ignore[arg-type]
            fpath = (*path, f.name)
            ftype = hints[f.name]
            if is_dataclass(ftype):
                sub = doc.get(f.name, {})
                if not isinstance(sub, dict):
                    self.problem(fpath, f"expected a table, got {_toml_type(sub)}")
                    ok = False
                    continue
                built = self.section(typing.cast(type, ftype), sub, fpath)
                ok = ok and built is not None
                values[f.name] = built
                continue
            args = typing.get_args(ftype)
            if typing.get_origin(ftype) is tuple and args and is_dataclass(args[0]):
                if f.name in doc:  # an array of tables, [[section.name]]
                    built_list: tuple[Any, ...] | None = self.table_array(
                        typing.cast(type, args[0]), doc[f.name], fpath, f.metadata["spec"]
                    )
                    ok = ok and built_list is not None
                    values[f.name] = built_list
                continue
            if f.name not in doc:
                if f.default is REQUIRED:
                    self.problem(fpath, "required key is missing", file=self.main_file)
                    ok = False
                else:
                    self.values[".".join(fpath)] = f.default
                continue
            value = self.value(fpath, ftype, f.metadata["spec"], doc[f.name])
            if value is MISSING:
                ok = False
            else:
                values[f.name] = value
                self.values[".".join(fpath)] = value
        return cls(**values) if ok else None

    def table_array(self, cls: type[T], raw: Any, path: tuple[str, ...], spec: Spec) -> tuple[T, ...] | None:
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            self.problem(path, f"expected an array of tables ([[{'.'.join(path)}]]), got {_toml_type(raw)}")
            return None
        *parent, name = path
        items = [self.section(cls, item, (*parent, f"{name}[{i}]")) for i, item in enumerate(raw)]
        if any(item is None for item in items):
            return None
        result = tuple(typing.cast(list[T], items))
        problem = spec.check(result) if spec.check else None
        if problem:
            self.problem(path, problem)
            return None
        return result

    def value(self, path: tuple[str, ...], ftype: Any, spec: Spec, raw: Any) -> Any:
        converted = _convert(ftype, raw)
        if converted is MISSING:
            self.problem(path, f"expected {_type_name(ftype)}, got {_toml_type(raw)}")
            return MISSING
        problem = _check_value(spec, converted)
        if problem:
            self.problem(path, problem)
            return MISSING
        if ftype is not str and isinstance(ftype, type) and issubclass(ftype, str):
            return ftype(converted)  # text parsed once, here: Duration, RenewBeforeText
        return converted


def _check_value(spec: Spec, value: Any) -> str | None:
    if spec.choices and value not in spec.choices:
        return f"{value!r} is not one of: {', '.join(spec.choices)}"
    if spec.minimum is not None and value < spec.minimum:
        return f"must be at least {spec.minimum:g}, got {value}"
    if spec.maximum is not None and value > spec.maximum:
        return f"must be at most {spec.maximum:g}, got {value}"
    return spec.check(value) if spec.check else None


def _convert(ftype: Any, raw: Any) -> Any:
    """TOML value -> field value, or MISSING when the TOML type does not fit."""
    if ftype is bool:
        return raw if isinstance(raw, bool) else MISSING
    if ftype is int:
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else MISSING
    if ftype is float:
        return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else MISSING
    if isinstance(ftype, type) and issubclass(ftype, str):  # Duration & co. are made once checked (value)
        return raw if isinstance(raw, str) else MISSING
    if ftype == tuple[tuple[str, str], ...]:  # a table of strings, kept sorted by key
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            return MISSING
        return tuple(sorted(raw.items()))
    if typing.get_origin(ftype) is tuple:
        (item_type, _ellipsis) = typing.get_args(ftype)
        if not isinstance(raw, list):
            return MISSING
        items = [_convert(item_type, item) for item in raw]
        return MISSING if any(i is MISSING for i in items) else tuple(items)
    raise TypeError(f"unsupported config field type {ftype!r}")  # a schema bug, not a user error


def _type_name(ftype: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", Duration: "a duration",
             RenewBeforeText: "a share or a duration"}  # fmt: skip
    if ftype in names:
        return names[ftype]
    if ftype == tuple[tuple[str, str], ...]:
        return "a table of strings"
    if typing.get_origin(ftype) is tuple:
        return f"an array of {_type_name(typing.get_args(ftype)[0]).split(' ', 1)[1]}s"
    return str(ftype)


def _toml_type(raw: Any) -> str:
    match raw:
        case bool():
            return f"boolean {str(raw).lower()}"
        case int():
            return f"integer {raw}"
        case float():
            return f"float {raw}"
        case str():
            return f"string {raw!r}"
        case list():
            return "an array"
        case dict():
            return "a table"
        case _:
            return type(raw).__name__  # dates and times


def cross_checks(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems that involve more than one key: (dotted key, problem). `values` holds every key that is
    valid on its own, so these are reported together with all other problems; a check whose inputs are
    themselves invalid is skipped (their own problems are already reported)."""
    problems: list[tuple[str, str]] = []
    mode, ca_file = values.get("upstream.validation_mode"), values.get("upstream.ca_file")
    if mode is not None and ca_file is not None:
        if mode in FILE_MODES and not ca_file:
            problems.append(("upstream.ca_file", f"required when validation_mode is {mode!r}"))
        if mode not in FILE_MODES and ca_file:
            problems.append(
                ("upstream.ca_file", f"only used with validation_mode legacy or custom, not {mode!r}")
            )
    issuer = values.get("renewal.issuer")
    if issuer == "command" and values.get("renewal.command") == ():
        problems.append(("renewal.command", 'required when issuer is "command"'))
    if issuer == "aws-fleet-provisioning" and values.get("renewal.template_name") == "":
        problems.append(("renewal.template_name", 'required when issuer is "aws-fleet-provisioning"'))
    largest = values.get("upstream.quota.max_message_bytes")
    for key, value in values.items():
        batch_size = key.startswith("forwarding.batch[") and key.endswith(".max_bytes")
        if batch_size and largest is not None and value > largest:
            problems.append((key, f"larger than upstream.quota.max_message_bytes ({largest})"))
    if values.get("identity.key_backend") == "tpm" and values.get("identity.tcti") == "":
        problems.append(("identity.tcti", 'required when key_backend is "tpm"'))
    return problems


def validate(doc: Mapping[str, Any], origins: Origins, main_file: str) -> Config:
    """Build a Config from a merged document, or raise ConfigError listing every problem."""
    walker = _Walker(origins, main_file)
    config = walker.section(Config, doc, ())
    for key, message in cross_checks(walker.values):
        walker.problem(tuple(key.split(".")), message)
    if walker.problems or config is None:
        raise ConfigError(walker.problems)
    return config


# ---------------------------------------------------------------- reload support


@dataclass(frozen=True)
class Change:
    key: str  # dotted
    old: Any
    new: Any
    live: bool


def leaves(obj: Any, path: tuple[str, ...] = ()) -> dict[str, tuple[Any, Spec]]:
    """Every leaf of a config tree: dotted key -> (value, spec)."""
    out: dict[str, tuple[Any, Spec]] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(leaves(value, (*path, f.name)))
        else:
            out[".".join((*path, f.name))] = (value, f.metadata["spec"])
    return out


def diff(old: Config, new: Config) -> list[Change]:
    """The keys whose values differ between two configs, each marked live or restart-only."""
    before, after = leaves(old), leaves(new)
    return [
        Change(key, before[key][0], value, spec.live)
        for key, (value, spec) in after.items()
        if before[key][0] != value
    ]


def with_live_changes(running: Config, new: Config) -> Config:
    """The running config with only the live keys taken from `new` (what a SIGHUP applies)."""

    def merge(cur: Any, nxt: Any) -> Any:
        updates: dict[str, Any] = {}
        for f in fields(cur):
            a, b = getattr(cur, f.name), getattr(nxt, f.name)
            if is_dataclass(a):
                updates[f.name] = merge(a, b)
            elif f.metadata["spec"].live:
                updates[f.name] = b
        return type(cur)(**{**{f.name: getattr(cur, f.name) for f in fields(cur)}, **updates})

    return typing.cast(Config, merge(running, new))
