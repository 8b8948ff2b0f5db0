"""`gatewayctl [--socket PATH | --config PATH] COMMAND`: talk to the running daemon; JSON on stdout.

On failure: a one-line error on stderr and exit status 1. The registry commands are named and shaped like
the AWS CLI's `aws iot ...`; file arguments may be written `file://PATH` as the AWS CLI wants them. When the
daemon is not running, identity and registry commands work on the state directory directly (under its lock).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from gatewayd import __version__
from gatewayd.core.commands import BY_NAME, COMMANDS, Arg, Command, Kind, cli_wording
from gatewayd.core.config import Config
from gatewayd.core.errors import (
    ConfigError,
    ControlError,
    DaemonUnreachable,
    EnvironmentProblem,
    GatewaydError,
    UsageError,
)
from gatewayd.service.control import request
from gatewayd.service.upstream.identity import Identity
from gatewayd.stores import atomic
from gatewayd.stores.configfile import load

DEFAULT_CONFIG = Path("/etc/gatewayd/gatewayd.toml")
DEFAULT_SOCKET = Path("/run/gatewayd/control.sock")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other gatewayctl failure."""

    usage_status = 2  # a registry command's parser: 252, the AWS CLI's

    def error(self, message: str) -> NoReturn:
        self.exit(self.usage_status, f"gatewayctl: {message} (see gatewayctl --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="gatewayctl", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"gatewayctl {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", type=Path, help=f"control socket (default: from the config, else {DEFAULT_SOCKET})"
    )
    where.add_argument(
        "--config", type=Path, help=f"read the socket path from this config (default {DEFAULT_CONFIG})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", help="the daemon's state, uplink, certificate and last reload")
    ident = sub.add_parser("identity", help="the gateway's own key and certificate").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    ident.add_parser("create-key", help="generate a new key (inside the TPM unless key_backend is file)")
    csr = ident.add_parser("create-csr", help="a CSR for the newest key, signed by it")
    csr.add_argument("--out", type=Path, help="also write the CSR (PEM) to this file")
    inst = ident.add_parser("install-certificate", help="check and install a certificate for a stored key")
    inst.add_argument(
        "certificate", type=Path, metavar="FILE", help="the certificate (PEM; may include its chain)"
    )
    inst.add_argument("--chain", type=Path, help="intermediate CA certificates (PEM)")
    ident.add_parser("show", help="certificate id, subject, issuer, validity, key and stored versions")
    renew = ident.add_parser("renew", help="renew now if due (see status: renewal.nextRenewal)")
    renew.add_argument("--now", action="store_true", help="renew now, whether due or not")
    sub.add_parser(
        "list-connections", help="sensors connected now: client id, certificate id, address, traffic"
    )
    disc = sub.add_parser("disconnect", help="close a sensor's connection")
    disc.add_argument("--client-id", required=True)
    trust = sub.add_parser("trust", help="the uplink's CA bundle").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    update = trust.add_parser(
        "update", help="switch the validation mode, proven by a trial connection first (kept across restarts)"
    )
    which = update.add_mutually_exclusive_group()
    which.add_argument("--mode", help="rsa, ecc, all, legacy or custom")
    which.add_argument("--from-config", action="store_true", help="return to the config's validation mode")
    update.add_argument("--ca-file", type=Path, help="for custom or legacy: the CA bundle (absolute path)")
    _registry_parsers(sub)
    stall = sub.add_parser("debug-stall-loop")  # tests only; the daemon refuses it unless told otherwise
    stall.add_argument("--seconds", type=float, required=True)
    _hide(sub, "debug-stall-loop")
    return parser


def _hide(sub: Any, name: str) -> None:
    """Leave a subcommand out of --help (argparse prints help=SUPPRESS ones as "==SUPPRESS==")."""
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != name]


def _registry_parsers(sub: Any) -> None:
    """One subcommand per entry of gatewayd.core.commands.COMMANDS, flags as the AWS CLI's."""
    for command in COMMANDS:
        parser = sub.add_parser(command.name, help=command.help, description=command.help)
        parser.usage_status = USAGE_AWS
        for arg in command.args:
            if not arg.cli:
                continue
            dest = _dest(arg)
            if arg.choices:  # listed, not enforced: as the AWS CLI, the service judges the value
                arg = dataclasses.replace(arg, help=f"{arg.help or 'one of'}: {', '.join(arg.choices)}")
            match arg.kind:
                case Kind.BOOL:
                    parser.add_argument(arg.flag, dest=dest, action=argparse.BooleanOptionalAction,
                                        default=None, help=arg.help)  # fmt: skip
                case Kind.INT:
                    parser.add_argument(arg.flag, dest=dest, type=int, help=arg.help, metavar="N")
                case Kind.PEM:
                    parser.add_argument(arg.flag, dest=dest, type=_inline_or_file, required=arg.required,
                                        metavar="TEXT|file://PATH", help=arg.help)  # fmt: skip
                case Kind.OUTFILE:
                    parser.add_argument(arg.flag, dest=dest, type=Path, required=arg.required,
                                        metavar="PATH", help=arg.help)  # fmt: skip
                case _:
                    parser.add_argument(arg.flag, dest=dest, required=arg.required, help=arg.help)
        if command.paged:
            parser.add_argument("--starting-token", help="the NextToken of an earlier call")
            parser.add_argument("--max-items", type=int, metavar="N", help="print at most N, then NextToken")
            parser.add_argument("--no-paginate", action="store_true",
                                help="one request only; print its nextMarker")  # fmt: skip


USAGE_AWS = 252  # the AWS CLI's status for a command line it cannot parse


def _dest(arg: Arg) -> str:
    return "arg_" + arg.flag[2:].replace("-", "_")


class _Text:
    """A PEM or JSON argument's text (given inline, or read from file://PATH)."""

    def __init__(self, text: str) -> None:
        self.text = text


MAX_INPUT = 48 * 1024


def _inline_or_file(value: str) -> _Text:
    """As the AWS CLI: `file://PATH` (or fileb://) reads the file, anything else is the value itself. A bare
    path to an existing file is read too (gatewayctl 0.1 took paths; the AWS CLI would send the path as
    text and fail)."""
    for prefix in ("file://", "fileb://"):
        if value.startswith(prefix):
            return _Text(_read_input(Path(value.removeprefix(prefix))))
    if "\n" not in value and not value.lstrip().startswith(("-----", "{")) and Path(value).is_file():
        return _Text(_read_input(Path(value)))
    return _Text(value)


def _read_input(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_INPUT:
            raise argparse.ArgumentTypeError(f"{path} is larger than {MAX_INPUT} bytes")
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _registry_body(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    """The control-socket arguments: each flag given, under its camelCase key (outfiles stay here)."""
    body: dict[str, Any] = {}
    for arg in command.args:
        if arg.kind is Kind.OUTFILE or not arg.cli:
            continue
        value = getattr(args, _dest(arg), None)
        if value is not None:
            body[arg.key] = value.text if isinstance(value, _Text) else value
    return body


def _outfiles(command: Command, args: argparse.Namespace) -> dict[str, Path]:
    found = {}
    for arg in command.args:
        path = getattr(args, _dest(arg), None) if arg.kind is Kind.OUTFILE else None
        if path is not None:
            found[arg.flag] = path
    return found


def _check_outfiles(paths: dict[str, Path]) -> None:
    """Refuse before the daemon does anything if an output file cannot be written where asked."""
    for path in paths.values():
        if path.is_dir():
            raise UsageError(f"{path} is a directory")
        if not path.parent.is_dir():
            raise UsageError(f"{path.parent} is not a directory")
        if not os.access(path.parent, os.W_OK):
            raise UsageError(f"cannot write into {path.parent}")


def _write_outputs(command: Command, paths: dict[str, Path], result: dict[str, Any]) -> None:
    """Write each asked-for part of the answer to its file (a private key mode 0600). A transfer's bundle
    or reply is then left out of what is printed: it is in the file."""
    for flag, path in paths.items():
        holder, key = result, command.outputs[flag]
        for part in key.split(".")[:-1]:
            holder = holder[part]
        value = holder[key.split(".")[-1]]
        data = json.dumps(value, indent=2, sort_keys=True) + "\n" if isinstance(value, dict) else str(value)
        atomic.write_file(path, data.encode(), 0o600 if "Private" in key else 0o644)
        if key in ("bundle", "reply"):
            del result[key]  # written: only now is it safe to leave it out of the printed result
            result[f"{key}File"] = str(path)


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    config_path = args.config or DEFAULT_CONFIG
    try:
        return Path(load(config_path).gateway.control_socket)
    except ConfigError as exc:
        if args.config is not None:  # asked for explicitly: its problems are the user's answer
            raise EnvironmentProblem(f"cannot use {config_path}: {exc.problems[0]}") from exc
        return DEFAULT_SOCKET


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewaydError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def _command(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    match args.command:
        case "debug-stall-loop":
            return args.command, {"seconds": args.seconds}
        case "disconnect":
            return args.command, {"clientId": args.client_id}
        case "trust":
            if not (args.mode or args.ca_file or args.from_config):
                raise GatewaydError("trust update needs --mode M, --ca-file F or --from-config")
            if args.from_config and args.ca_file:
                raise GatewaydError("--from-config takes the CA file from the config: drop --ca-file")
            mode = args.mode or ("custom" if args.ca_file and not args.from_config else "")
            ca_file = str(args.ca_file.absolute()) if args.ca_file else ""
            return "trust", {
                "action": "update",
                "mode": mode,
                "caFile": ca_file,
                "fromConfig": args.from_config,
            }
        case "identity":
            body: dict[str, Any] = {"action": args.action}
            if args.action == "renew":
                body["now"] = args.now
            if args.action == "install-certificate":
                body["certificatePem"] = _read(args.certificate, "certificate")
                body["chainPem"] = _read(args.chain, "chain") if args.chain else ""
            return "identity", body
    return args.command, {}


@contextlib.contextmanager
def _as_owner_of(state_dir: Path) -> Iterator[None]:
    """Root working on a state directory that belongs to the daemon's user (gatewayd under the package's
    unit) acts as that user, with its groups (tss, for the TPM), so that every file it writes stays readable
    by the daemon. Only the effective ids change, and they are restored afterwards, so output files land
    where root asked. A directory that root owns (not yet started under systemd, which hands it over to the
    unit's user at start) is used as root."""
    try:
        owner = state_dir.stat()
    except FileNotFoundError:
        owner = None
    if os.geteuid() != 0 or owner is None or owner.st_uid == 0:
        yield
        return
    try:
        groups = os.getgrouplist(pwd.getpwuid(owner.st_uid).pw_name, owner.st_gid)
    except KeyError:
        groups = [owner.st_gid]
    saved_groups = os.getgroups()
    os.setgroups(groups)
    os.setegid(owner.st_gid)
    os.seteuid(owner.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved_groups)


def _offline(args: argparse.Namespace, command: str, body: dict[str, Any]) -> Any:
    config_path = args.config or DEFAULT_CONFIG
    try:
        config = load(config_path)
    except ConfigError as exc:
        raise EnvironmentProblem(
            f"the daemon is not running and {config_path} is unusable: {exc.problems[0]}"
        ) from exc
    with _as_owner_of(Path(config.gateway.state_dir)):
        return _offline_work(config, command, body)


def _offline_work(config: Config, command: str, body: dict[str, Any]) -> Any:
    """The daemon is not running: do an identity or registry command on the state directory, under its lock
    (so a daemon cannot start meanwhile)."""
    from gatewayd.service.downstream.registry_commands import run_command
    from gatewayd.service.root import open_registry
    from gatewayd.service.upstream.identity import run_identity_action
    from gatewayd.stores.identity import IdentityStore
    from gatewayd.stores.statedir import ensure_state_dir

    state_dir = Path(config.gateway.state_dir)
    ensure_state_dir(state_dir)
    store = IdentityStore(state_dir, config.identity.keep_versions)
    with store.locked() as locked:
        locked.recover()
        if command == "identity":  # a short-lived process: the TPM library in process, no helper per call
            from gatewayd.adapters import tpm

            return run_identity_action(Identity(config, locked, tpm), body["action"], body)
        with open_registry(config) as service:  # as the daemon opens it (service/root.py)
            return run_command(service, command, body)


def _command_word(argv: list[str]) -> str:
    """The command named on a command line (after the global options), or ""."""
    words = iter(argv)
    for word in words:
        if word in ("--socket", "--config"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    registry_command = BY_NAME.get(_command_word(argv))
    parser = _parser()
    parser.usage_status = USAGE_AWS if registry_command else 2  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    if registry_command is not None:
        return _registry_main(args, registry_command)
    try:
        command, body = _command(args)
        try:
            result = request(socket_path(args), command, body)
        except DaemonUnreachable:
            if command != "identity" or body["action"] == "renew":
                raise  # renewal needs the running daemon (its uplink proves the new certificate)
            result = _offline(args, command, body)
        if command == "identity" and args.action == "create-csr" and args.out is not None:
            args.out.write_text(result["csrPem"])
            result["csrFile"] = str(args.out)
    except (GatewaydError, OSError) as exc:
        print(f"gatewayctl: {cli_wording(str(getattr(exc, 'strerror', None) or exc))}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


# The AWS CLI's exit statuses, which registry commands keep: the service refused (254), the environment or
# configuration is unusable (253: no daemon and no usable config, no permission), anything else (255).
REFUSED, ENVIRONMENT, OTHER = 254, 253, 255


def _registry_main(args: argparse.Namespace, command: Command) -> int:
    """A registry command, as the AWS CLI runs `aws iot <command>`: JSON in the operation's shape on stdout
    (nothing when the operation returns nothing), refusals as `An error occurred (Name) when calling the
    Operation operation: message` on stderr, the AWS CLI's exit statuses."""
    try:
        body = _registry_body(command, args)
        paths = _outfiles(command, args)
        _check_outfiles(paths)
        result = _registry_call(args, command, body)
    except UsageError as exc:
        print(f"gatewayctl: {exc} (see gatewayctl {command.name} --help)", file=sys.stderr)
        return USAGE_AWS
    except GatewaydError as exc:
        message = cli_wording(str(exc), command)  # the daemon names arguments by their keys: here, flags
        if exc.code:
            line = f"An error occurred ({exc.code}) when calling the {command.operation} operation: {message}"
            print(f"\n{line}", file=sys.stderr)
            return REFUSED
        print(f"gatewayctl: {message}", file=sys.stderr)
        return ENVIRONMENT if isinstance(exc, (EnvironmentProblem, ControlError)) else OTHER
    except OSError as exc:
        print(f"gatewayctl: {exc.strerror or exc}", file=sys.stderr)
        return OTHER
    status = 0
    try:
        _write_outputs(command, paths, result)
    except OSError as exc:  # the command is done: print its result all the same, so nothing is lost
        print(f"gatewayctl: the command succeeded but writing its output file failed: {exc}", file=sys.stderr)
        status = OTHER
    if result:
        json.dump(result, sys.stdout, indent=4, ensure_ascii=False)
        sys.stdout.write("\n")
    return status


def _registry_call(args: argparse.Namespace, command: Command, body: dict[str, Any]) -> dict[str, Any]:
    if not command.paged:
        return _ask(args, command.name, body)
    if args.max_items is not None and args.max_items < 1:
        raise UsageError("--max-items must be at least 1")
    if args.no_paginate:  # one request, its raw answer (nextMarker included), as the AWS CLI's
        if args.max_items is not None:
            raise UsageError("--no-paginate and --max-items exclude each other")
        return _ask(args, command.name, {**body, "marker": args.starting_token})
    return _all_pages(args, command, body)


def _all_pages(args: argparse.Namespace, command: Command, body: dict[str, Any]) -> dict[str, Any]:
    """Every item, page by page, as the AWS CLI paginates: with --max-items at most that many and, when
    more remain, NextToken to pass as --starting-token (here the service's marker itself: the last page is
    asked for exactly the items still wanted, so a token never points inside a page)."""
    items: list[Any] = []
    marker, left = args.starting_token, args.max_items
    seen: set[str] = set()
    while True:
        page_body = dict(body)
        if left is not None:
            page_body["pageSize"] = min(body.get("pageSize") or 25, left)
        page = _ask(args, command.name, {**page_body, "marker": marker})
        items += page["certificates"]
        marker = page.get("nextMarker")
        if left is not None:
            left -= len(page["certificates"])
        if not marker or left == 0:
            break
        if marker in seen:  # the daemon would have to be broken: never loop
            raise GatewaydError(f"the daemon returned marker {marker} twice")
        seen.add(marker)
    result: dict[str, Any] = {"certificates": items}
    if marker:
        result["NextToken"] = marker
    return result


def _ask(args: argparse.Namespace, name: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {key: value for key, value in body.items() if value is not None}
    try:
        result: dict[str, Any] = request(socket_path(args), name, body)
    except DaemonUnreachable:
        result = _offline(args, name, body)
    return result


if __name__ == "__main__":
    sys.exit(main())
