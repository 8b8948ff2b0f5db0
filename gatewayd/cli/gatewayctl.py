"""`gatewayctl [--socket PATH | --config PATH] COMMAND`: talk to the running daemon; JSON on stdout.

On failure: a one-line error on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from gatewayd import __version__
from gatewayd.core.errors import ConfigError, GatewaydError
from gatewayd.service.control import DaemonUnreachable, request
from gatewayd.service.identity import Identity
from gatewayd.stores.configfile import load

DEFAULT_CONFIG = Path("/etc/gatewayd/gatewayd.toml")
DEFAULT_SOCKET = Path("/run/gatewayd/control.sock")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other gatewayctl failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gatewayctl: {message} (see gatewayctl --help)\n")


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
    sub.add_parser(
        "list-connections", help="sensors connected now: client id, certificate id, address, traffic"
    )
    disc = sub.add_parser("disconnect", help="close a sensor's connection")
    disc.add_argument("--client-id", required=True)
    stall = sub.add_parser("debug-stall-loop", help=argparse.SUPPRESS)
    stall.add_argument("--seconds", type=float, required=True)
    return parser


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    config_path = args.config or DEFAULT_CONFIG
    try:
        return Path(load(config_path).gateway.control_socket)
    except ConfigError as exc:
        if args.config is not None:  # asked for explicitly: its problems are the user's answer
            raise GatewaydError(f"cannot use {config_path}: {exc.problems[0]}") from exc
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
        case "identity":
            body: dict[str, Any] = {"action": args.action}
            if args.action == "install-certificate":
                body["certificatePem"] = _read(args.certificate, "certificate")
                body["chainPem"] = _read(args.chain, "chain") if args.chain else ""
            return "identity", body
    return args.command, {}


def _offline(args: argparse.Namespace, body: dict[str, Any]) -> Any:
    """The daemon is not running: do the identity action on the state directory, under its lock."""
    from gatewayd.service.upstream import run_identity_action
    from gatewayd.stores.identity import IdentityStore
    from gatewayd.stores.statedir import ensure_state_dir

    config_path = args.config or DEFAULT_CONFIG
    try:
        config = load(config_path)
    except ConfigError as exc:
        raise GatewaydError(
            f"the daemon is not running and {config_path} is unusable: {exc.problems[0]}"
        ) from exc
    ensure_state_dir(Path(config.gateway.state_dir))
    store = IdentityStore(Path(config.gateway.state_dir), config.identity.keep_versions)
    with store.locked() as locked:
        locked.recover()
        return run_identity_action(Identity(config, locked), body["action"], body)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        command, body = _command(args)
        try:
            result = request(socket_path(args), command, body)
        except DaemonUnreachable:
            if command != "identity":
                raise
            result = _offline(args, body)
        if command == "identity" and args.action == "create-csr" and args.out is not None:
            args.out.write_text(result["csrPem"])
            result["csrFile"] = str(args.out)
    except (GatewaydError, OSError) as exc:
        print(f"gatewayctl: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
