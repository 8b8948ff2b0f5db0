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
from gatewayd.service.control import request
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
    sub.add_parser("status", help="the daemon's state, configuration summary and last reload")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command_args: dict[str, Any] = {}
    if args.command == "debug-stall-loop":
        command_args["seconds"] = args.seconds
    try:
        result = request(socket_path(args), args.command, command_args)
    except GatewaydError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
