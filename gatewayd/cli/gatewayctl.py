"""`gatewayctl [--socket PATH | --config PATH] COMMAND`: talk to the running daemon; JSON on stdout.

On failure: a one-line error on stderr and exit status 1. The registry commands are named and shaped like
the AWS CLI's `aws iot ...`; file arguments may be written `file://PATH` as the AWS CLI wants them. When the
daemon is not running, identity and registry commands work on the state directory directly (under its lock).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from gatewayd import __version__
from gatewayd.core.config import Config
from gatewayd.core.errors import ConfigError, GatewaydError
from gatewayd.service.control import DaemonUnreachable, request
from gatewayd.service.identity import Identity
from gatewayd.service.registry import CHANGES as REGISTRY_COMMANDS
from gatewayd.stores import atomic
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
    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        return parser

    def cid(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--certificate-id", required=True, help="64 hex digits (SHA-256 of the DER)")

    def paging(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--page-size", type=int, default=25, help="1-250 (default 25)")
        parser.add_argument("--marker", help="nextMarker of the previous page")
        parser.add_argument("--ascending-order", action="store_true", help="oldest first")

    status_help = "ACTIVE or INACTIVE (default INACTIVE, as AWS IoT's)"
    p = cmd("create-keys-and-certificate", "a new key pair and a certificate from the gateway's local CA")
    p.add_argument("--set-as-active", action="store_true")
    p.add_argument("--common-name", help="the certificate's CN = the sensor's client id (default: generated)")
    p.add_argument("--certificate-pem-outfile", type=Path)
    p.add_argument("--public-key-outfile", type=Path)
    p.add_argument("--private-key-outfile", type=Path, help="written mode 0600")
    p = cmd(
        "create-certificate-from-csr",
        "a certificate from the gateway's local CA for a key the sensor keeps (the CSR's CN: its client id)",
    )
    p.add_argument("--certificate-signing-request", type=_file, required=True, metavar="FILE")
    p.add_argument("--set-as-active", action="store_true")
    p.add_argument("--certificate-pem-outfile", type=Path)
    cmd("get-registration-code", "the code a CA's verification certificate must carry as its CN")
    p = cmd("register-ca-certificate", "register a sensor CA, with proof of possession of its key")
    p.add_argument("--ca-certificate", type=_file, required=True, metavar="FILE")
    p.add_argument("--verification-certificate", type=_file, required=True, metavar="FILE")
    p.add_argument("--set-as-active", action="store_true")
    p.add_argument("--allow-auto-registration", action="store_true")
    p = cmd("update-ca-certificate", "change a CA certificate's status or auto-registration")
    cid(p)
    p.add_argument("--new-status", help="ACTIVE or INACTIVE")
    p.add_argument("--new-auto-registration-status", help="ENABLE or DISABLE")
    cid(cmd("describe-ca-certificate", "one CA certificate, with its PEM"))
    cmd("list-ca-certificates", "the registered CA certificates")
    cid(cmd("delete-ca-certificate", "remove an INACTIVE CA certificate no device certificate refers to"))
    p = cmd("register-certificate", "register a device certificate issued by a registered, ACTIVE CA")
    p.add_argument("--certificate-pem", type=_file, required=True, metavar="FILE")
    p.add_argument("--ca-certificate-pem", type=_file, metavar="FILE", help="default: found among the CAs")
    p.add_argument("--status", help=status_help)
    p.add_argument("--set-as-active", action="store_true", help="the same as --status ACTIVE")
    p = cmd("register-certificate-without-ca", "register a device certificate whose CA is not registered")
    p.add_argument("--certificate-pem", type=_file, required=True, metavar="FILE")
    p.add_argument("--status", help=status_help)
    p = cmd("update-certificate", "ACTIVE, INACTIVE or REVOKED (final); takes effect at once")
    cid(p)
    p.add_argument("--new-status", required=True)
    cid(cmd("describe-certificate", "one device certificate, with its PEM and transfer data"))
    paging(cmd("list-certificates", "device certificates, newest first"))
    p = cmd("list-certificates-by-ca", "device certificates issued by one registered CA")
    p.add_argument("--ca-certificate-id", required=True)
    paging(p)
    cid(cmd("delete-certificate", "remove a device certificate that is not ACTIVE"))
    p = cmd("transfer-certificate", "start moving an INACTIVE certificate to another gateway")
    cid(p)
    p.add_argument("--target-gateway", required=True, help="the target gateway's thing name")
    p.add_argument("--transfer-message", default="")
    p.add_argument("--outfile", type=Path, required=True, help="the transfer bundle to carry to the target")
    for name, text in (("accept", "register a transferred certificate here"), ("reject", "decline it")):
        p = cmd(f"{name}-certificate-transfer", f"on the target gateway: {text}; writes a reply file")
        p.add_argument("--bundle", type=_file, required=True, metavar="FILE")
        p.add_argument("--reply-outfile", type=Path, required=True, help="the reply to carry back")
        p.add_argument(
            "--expect-signer", metavar="ID", help="refuse unless the source's local CA has this id"
        )
        if name == "accept":
            p.add_argument("--set-as-active", action="store_true")
        else:
            p.add_argument("--reject-reason", default="")
    cid(
        cmd(
            "cancel-certificate-transfer",
            "on the source: end a pending transfer; the certificate is INACTIVE",
        )
    )
    p = cmd("complete-certificate-transfer", "on the source: apply the target's reply")
    p.add_argument("--reply", type=_file, required=True, metavar="FILE")
    p.add_argument("--expect-signer", metavar="ID", help="refuse unless the target's local CA has this id")
    p = cmd("describe-endpoint", "the host name sensors connect to, the listeners and the CA they must trust")
    p.add_argument("--endpoint-type", help="iot:Data-ATS or iot:Data (the same host name here)")
    p.add_argument("--ca-certificate-outfile", type=Path, help="also write the CA certificate (PEM) here")


class _File:
    """A file argument read at parse time (accepts the AWS CLI's file://PATH form)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text


MAX_INPUT = 48 * 1024


def _file(value: str) -> _File:
    path = Path(value.removeprefix("file://"))
    try:
        if path.stat().st_size > MAX_INPUT:
            raise argparse.ArgumentTypeError(f"{path} is larger than {MAX_INPUT} bytes")
        return _File(path, path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _camel(flag: str) -> str:
    head, *rest = flag.split("_")
    return head + "".join(word.capitalize() for word in rest)


OUTFILES = {
    "certificate_pem_outfile", "public_key_outfile", "private_key_outfile", "outfile", "reply_outfile",
    "ca_certificate_outfile",
}  # fmt: skip


def _registry_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in ("command", "socket", "config") or key in OUTFILES or value is None:
            continue
        body[_camel(key)] = value.text if isinstance(value, _File) else value
    if body.pop("setAsActive", False) and args.command == "register-certificate":
        if body.get("status") not in (None, "ACTIVE"):
            raise GatewaydError("--set-as-active and --status disagree")
        body["status"] = "ACTIVE"
    elif args.command in (
        "create-keys-and-certificate",
        "create-certificate-from-csr",
        "register-ca-certificate",
        "accept-certificate-transfer",
    ):
        body["setAsActive"] = args.set_as_active
    return body


def _check_outfiles(args: argparse.Namespace) -> None:
    """Refuse before the daemon does anything if an output file cannot be written where asked."""
    for key in OUTFILES:
        path = getattr(args, key, None)
        if path is None:
            continue
        if path.is_dir():
            raise GatewaydError(f"{path} is a directory")
        if not path.parent.is_dir():
            raise GatewaydError(f"{path.parent} is not a directory")
        if not os.access(path.parent, os.W_OK):
            raise GatewaydError(f"cannot write into {path.parent}")


def _write_outputs(args: argparse.Namespace, result: dict[str, Any]) -> None:
    def out(key: str, data: str, mode: int = 0o644) -> Path | None:
        path: Path | None = getattr(args, key, None)
        if path is not None:
            atomic.write_file(path, data.encode(), mode)
        return path

    match args.command:
        case "create-keys-and-certificate":
            out("certificate_pem_outfile", result["certificatePem"])
            out("public_key_outfile", result["keyPair"]["PublicKey"])
            out("private_key_outfile", result["keyPair"]["PrivateKey"], 0o600)
        case "create-certificate-from-csr":
            out("certificate_pem_outfile", result["certificatePem"])
        case "transfer-certificate":
            out("outfile", json.dumps(result["bundle"], indent=2, sort_keys=True) + "\n")
            del result["bundle"]  # written: only now is it safe to leave it out of the printed result
            result["bundleFile"] = str(args.outfile)
        case "accept-certificate-transfer" | "reject-certificate-transfer":
            out("reply_outfile", json.dumps(result["reply"], indent=2, sort_keys=True) + "\n")
            del result["reply"]
            result["replyFile"] = str(args.reply_outfile)
        case "describe-endpoint":
            out("ca_certificate_outfile", result["caCertificatePem"])


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
    if args.command in REGISTRY_COMMANDS:
        return args.command, _registry_body(args)
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
        raise GatewaydError(
            f"the daemon is not running and {config_path} is unusable: {exc.problems[0]}"
        ) from exc
    with _as_owner_of(Path(config.gateway.state_dir)):
        return _offline_work(config, command, body)


def _offline_work(config: Config, command: str, body: dict[str, Any]) -> Any:
    """The daemon is not running: do an identity or registry command on the state directory, under its lock
    (so a daemon cannot start meanwhile)."""
    from gatewayd.service.registry import RegistryService, run_command
    from gatewayd.service.upstream import run_identity_action
    from gatewayd.stores.identity import IdentityStore
    from gatewayd.stores.localca import LocalCA
    from gatewayd.stores.registry import Registry
    from gatewayd.stores.statedir import ensure_state_dir

    state_dir = Path(config.gateway.state_dir)
    ensure_state_dir(state_dir)
    store = IdentityStore(state_dir, config.identity.keep_versions)
    with store.locked() as locked:
        locked.recover()
        if command == "identity":  # a short-lived process: the TPM library in process, no helper per call
            from gatewayd.adapters import tpm

            return run_identity_action(Identity(config, locked, tpm), body["action"], body)
        local_ca = LocalCA(state_dir, config.gateway.thing_name)
        local_ca.ensure()
        registry = Registry(state_dir / "registry.db", config.gateway.thing_name)
        try:
            service = RegistryService(registry, local_ca, config.gateway.thing_name)
            service.configure(config)
            return run_command(service, command, body)
        finally:
            registry.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        command, body = _command(args)
        _check_outfiles(args)
        try:
            result = request(socket_path(args), command, body)
        except DaemonUnreachable:
            if (command != "identity" or body["action"] == "renew") and command not in REGISTRY_COMMANDS:
                raise  # renewal needs the running daemon (its uplink proves the new certificate)
            result = _offline(args, command, body)
        if command == "identity" and args.action == "create-csr" and args.out is not None:
            args.out.write_text(result["csrPem"])
            result["csrFile"] = str(args.out)
    except (GatewaydError, OSError) as exc:
        print(f"gatewayctl: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    status = 0
    try:
        _write_outputs(args, result)
    except OSError as exc:  # the command is done: print its result all the same, so nothing is lost
        print(f"gatewayctl: the command succeeded but writing its output file failed: {exc}", file=sys.stderr)
        status = 1
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
