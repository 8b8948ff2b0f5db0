"""The control socket's registry commands: a request checked against the command table
(core/commands.py: every argument's key and kind), run on the RegistryService, and logged when it changes
the registry (REGISTRY_CHANGED). The daemon and gatewayctl's offline mode both run commands through here."""

from __future__ import annotations

import logging
from typing import Any

from gatewayd.core import logevents
from gatewayd.core.commands import BY_NAME, Command, Kind, check_value
from gatewayd.core.errors import AwsError, GatewaydError, RegistryError, TransitionRefused
from gatewayd.service.downstream.registry import RegistryService

log = logging.getLogger("gatewayd.registry")


def _arguments(command: Command, args: dict[str, Any]) -> dict[str, Any]:
    """The service method's keywords from a control-socket request, checked against the command table."""
    known = {a.key: a for a in command.args if a.kind is not Kind.OUTFILE}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise RegistryError(f"{command.name} takes no {', '.join(repr(k) for k in unknown)}")
    keywords: dict[str, Any] = {}
    for key, arg in known.items():
        value = args.get(key)
        if value is None or value == "":
            if arg.required:
                raise RegistryError(f"'{arg.key}' is required")
            continue
        problem = check_value(arg, value)
        if problem:
            raise RegistryError(f"'{arg.key}' {problem}")
        keywords[arg.keyword] = value
    return keywords


def run_command(service: RegistryService, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one registry command of gatewayd.core.commands; a change is logged (REGISTRY_CHANGED).

    RegistryError (one line, with AWS's exception name as `code`): refused, nothing written."""
    spec = BY_NAME.get(command)
    if spec is None:
        raise RegistryError(f"unknown registry command {command!r}")
    try:
        result: dict[str, Any] = getattr(service, spec.method)(**_arguments(spec, args))
    except TransitionRefused:
        raise
    except GatewaydError as exc:
        if not exc.code:
            exc.code = AwsError.INVALID_REQUEST.value
        raise
    except ValueError as exc:  # e.g. an unknown status name reaching an enum
        raise RegistryError(str(exc)) from None
    if spec.changes:
        cid = str(result.get("certificateId") or args.get("certificateId") or "")
        status = str(args.get("newStatus") or result.get("status") or "")
        log.info(
            "registry: %s %s%s",
            command,
            cid or "-",
            f" -> {status}" if status else "",
            extra=logevents.extra(
                logevents.REGISTRY_CHANGED, command=command, certificate_id=cid, status=status
            ),
        )
    return result
