"""Every journald MESSAGE_ID gatewayd emits, defined in this one module.

An operator alerts on these ids (``journalctl MESSAGE_ID=...``), so an id never changes once released.
docs/messages.md documents each one; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Priority(IntEnum):
    """syslog priorities, as journald's PRIORITY= field uses them."""

    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


@dataclass(frozen=True)
class Message:
    name: str
    id: str  # 128-bit id, 32 lowercase hex digits, as sd-id128 formats it
    priority: Priority
    summary: str
    action: str  # what an operator should do; "" when nothing


STARTED = Message(
    "STARTED",
    "4424b38321b54e6284e8d941ce335ae1",
    Priority.NOTICE,
    "gatewayd started all its components and told systemd it is ready.",
    "",
)
STOPPING = Message(
    "STOPPING",
    "ff238b37fe304f88bcd5ed36e8752adf",
    Priority.NOTICE,
    "gatewayd received SIGTERM or SIGINT and is closing its connections.",
    "",
)
STOPPED = Message(
    "STOPPED",
    "b22034a63fa5412f961e84697eacad93",
    Priority.NOTICE,
    "gatewayd finished a clean shutdown.",
    "",
)
CONFIG_INVALID = Message(
    "CONFIG_INVALID",
    "5433ee6686064fe093cd41e0cf6789c5",
    Priority.ERR,
    "The configuration is invalid at start; gatewayd exits with status 78 and systemd does not restart it.",
    "Fix every FILE:section.key line logged with this message, check with "
    "`gatewayd check-config --config PATH`, then start the service again.",
)
CONFIG_RELOADED = Message(
    "CONFIG_RELOADED",
    "f888cd108c4b40578400b26460a642c9",
    Priority.NOTICE,
    "SIGHUP (systemctl reload): the configuration was re-read and the live keys were applied.",
    "",
)
CONFIG_RELOAD_REFUSED = Message(
    "CONFIG_RELOAD_REFUSED",
    "c219c94109484390859b46b4ca7d38b9",
    Priority.ERR,
    "SIGHUP: the new configuration is invalid, so it was refused; the running configuration stays in force.",
    "Fix the problems logged with this message, then reload again.",
)
CONFIG_RESTART_REQUIRED = Message(
    "CONFIG_RESTART_REQUIRED",
    "b04cdcb0692e45d18bbedefdd0ded8d1",
    Priority.WARNING,
    "SIGHUP: a changed key cannot be applied live; the running value stays until the service restarts. "
    "The key is in the GATEWAYD_CONFIG_KEY field.",
    "Restart the service (`systemctl restart gatewayd`) when convenient.",
)
FATAL_ERROR = Message(
    "FATAL_ERROR",
    "4a318c3303c441059a56d618d2fec6ea",
    Priority.ERR,
    "gatewayd stopped because of an unexpected error; systemd restarts it (Restart=on-failure).",
    "Read the traceback in this entry and report it with the gatewayd version.",
)

ALL: tuple[Message, ...] = (
    STARTED,
    STOPPING,
    STOPPED,
    CONFIG_INVALID,
    CONFIG_RELOADED,
    CONFIG_RELOAD_REFUSED,
    CONFIG_RESTART_REQUIRED,
    FATAL_ERROR,
)


def extra(message: Message, **fields: object) -> dict[str, object]:
    """`extra=` for a logging call: attaches the MESSAGE_ID and structured fields to the record."""
    return {"message_id": message.id, "message_name": message.name, "fields": fields}
