"""The registry's commands, declared once: gatewayctl's argument parser, the control socket's dispatch and
the man page are all made from COMMANDS.

Each command is named as the AWS CLI's `aws iot <name>` and answers with the AWS operation's output shape;
each argument is an AWS CLI flag (`--certificate-id`) whose JSON key on the control socket is its camelCase
(`certificateId`), passed to the RegistryService method `method` as the keyword `param`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(Enum):
    TEXT = "text"  # a string
    PEM = "pem"  # a string given inline or as file://PATH (the AWS CLI's way), read by gatewayctl
    BOOL = "bool"  # --flag / --no-flag
    INT = "int"
    OUTFILE = "outfile"  # gatewayctl writes part of the answer to this file; never sent to the daemon


@dataclass(frozen=True)
class Arg:
    flag: str  # "--certificate-id"
    kind: Kind = Kind.TEXT
    param: str = ""  # the service method's keyword; default: the flag in snake_case
    required: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()  # for help and completion; the service checks the value
    aws: bool = True  # False: gatewayd's own (docs/sensors.md's table says why)
    cli: bool = True  # False: the control socket's only (gatewayctl sets it from its paging flags)

    @property
    def key(self) -> str:
        """The control socket's JSON key: the flag in camelCase, as AWS's API member names."""
        head, *rest = self.flag[2:].split("-")
        return head + "".join(word.capitalize() for word in rest)

    @property
    def keyword(self) -> str:
        return self.param or self.flag[2:].replace("-", "_")


@dataclass(frozen=True)
class Command:
    name: str  # gatewayctl's (and the AWS CLI's) command
    operation: str  # AWS's API operation, named in error messages as the AWS CLI does
    help: str
    method: str  # the RegistryService method
    changes: bool  # changes the registry (the daemon then re-checks connected sensors)
    args: tuple[Arg, ...] = ()
    paged: bool = False  # a list: gatewayctl fetches every page unless told otherwise
    aws: bool = True  # False: gatewayd's own command
    outputs: dict[str, str] = field(default_factory=dict)  # outfile flag -> result key it writes
    own: tuple[str, ...] = ()  # output fields AWS's operation does not have (dotted paths): gatewayd's own

    def arg(self, flag: str) -> Arg:
        return next(a for a in self.args if a.flag == flag)


CERTIFICATE_ID = Arg(
    "--certificate-id", param="cid", required=True, help="64 hex digits (SHA-256 of the DER)"
)
SET_AS_ACTIVE = Arg("--set-as-active", Kind.BOOL, help="ACTIVE at once (default: INACTIVE, as AWS IoT's)")
STATUS = Arg("--status", choices=("ACTIVE", "INACTIVE"), help="ACTIVE or INACTIVE (default INACTIVE)")
EXPECT_SIGNER = Arg(
    "--expect-signer", aws=False, help="refuse unless the other gateway's local CA has this certificate id"
)
BUNDLE = Arg(
    "--bundle", Kind.PEM, param="bundle_text", required=True, aws=False,
    help="the bundle from transfer-certificate (AWS: --certificate-id)",
)  # fmt: skip
REPLY_OUTFILE = Arg("--reply-outfile", Kind.OUTFILE, required=True, help="the reply to carry back")
PAGING = (
    Arg("--page-size", Kind.INT, help="1-250 per request (default 25); every page is fetched all the same"),
    Arg("--marker", cli=False, help="continue after this marker (gatewayctl: --starting-token)"),
    Arg("--ascending-order", Kind.BOOL, param="ascending", help="oldest first (default: newest first)"),
)

TRANSFER_OWN = tuple(
    f"certificateDescription.transferData.{key}"
    for key in ("targetGateway", "transferId", "bundleDigest", "expires")
)  # a transfer between gateways: to whom, which bundle, until when

COMMANDS: tuple[Command, ...] = (
    Command(
        "create-keys-and-certificate", "CreateKeysAndCertificate",
        "a new key pair and a certificate from the gateway's local CA", "create_keys_and_certificate", True,
        (
            SET_AS_ACTIVE,
            Arg("--common-name", param="common_name_", aws=False,
                help="the certificate's CN = the sensor's client id (default: generated)"),
            Arg("--certificate-pem-outfile", Kind.OUTFILE),
            Arg("--public-key-outfile", Kind.OUTFILE),
            Arg("--private-key-outfile", Kind.OUTFILE, help="written mode 0600"),
        ),
        outputs={"--certificate-pem-outfile": "certificatePem", "--public-key-outfile": "keyPair.PublicKey",
                 "--private-key-outfile": "keyPair.PrivateKey"},
        own=("commonName",),
    ),
    Command(
        "create-certificate-from-csr", "CreateCertificateFromCsr",
        "a certificate from the gateway's local CA for a key the sensor keeps (the CSR's CN: its client id)",
        "create_certificate_from_csr", True,
        (
            Arg("--certificate-signing-request", Kind.PEM, param="csr_pem", required=True),
            SET_AS_ACTIVE,
            Arg("--certificate-pem-outfile", Kind.OUTFILE),
        ),
        outputs={"--certificate-pem-outfile": "certificatePem"},
    ),
    Command(
        "get-registration-code", "GetRegistrationCode",
        "the code a CA's verification certificate must carry as its CN", "get_registration_code", False,
    ),
    Command(
        "delete-registration-code", "DeleteRegistrationCode",
        "forget the registration code; the next get-registration-code makes a new one",
        "delete_registration_code", True,
    ),
    Command(
        "register-ca-certificate", "RegisterCACertificate",
        "register a sensor CA, with proof of possession of its key", "register_ca_certificate", True,
        (
            Arg("--ca-certificate", Kind.PEM, param="ca_pem", required=True),
            Arg("--verification-certificate", Kind.PEM, param="verification_pem", required=True,
                help="signed by the CA's key, its CN the registration code"),
            SET_AS_ACTIVE,
            Arg("--allow-auto-registration", Kind.BOOL,
                help="register device certificates it issued at their first connection (JITR)"),
        ),
    ),
    Command(
        "update-ca-certificate", "UpdateCACertificate",
        "change a CA certificate's status or auto-registration", "update_ca_certificate", True,
        (
            CERTIFICATE_ID,
            Arg("--new-status", choices=("ACTIVE", "INACTIVE")),
            Arg("--new-auto-registration-status", choices=("ENABLE", "DISABLE")),
        ),
    ),
    Command(
        "describe-ca-certificate", "DescribeCACertificate", "one CA certificate, with its PEM",
        "describe_ca_certificate", False, (CERTIFICATE_ID,),
    ),
    Command(
        "list-ca-certificates", "ListCACertificates", "the registered CA certificates",
        "list_ca_certificates", False, PAGING, paged=True,
    ),
    Command(
        "delete-ca-certificate", "DeleteCACertificate",
        "remove an INACTIVE CA certificate no device certificate refers to", "delete_ca_certificate", True,
        (CERTIFICATE_ID,),
    ),
    Command(
        "register-certificate", "RegisterCertificate",
        "register a device certificate issued by a registered, ACTIVE CA", "register_certificate", True,
        (
            Arg("--certificate-pem", Kind.PEM, param="cert_pem", required=True),
            Arg("--ca-certificate-pem", Kind.PEM, param="ca_pem", help="default: found among the CAs"),
            STATUS,
            Arg("--set-as-active", Kind.BOOL, help="the same as --status ACTIVE (deprecated by AWS)"),
        ),
    ),
    Command(
        "register-certificate-without-ca", "RegisterCertificateWithoutCA",
        "register a device certificate whose CA is not registered", "register_certificate_without_ca", True,
        (Arg("--certificate-pem", Kind.PEM, param="cert_pem", required=True), STATUS),
    ),
    Command(
        "update-certificate", "UpdateCertificate",
        "ACTIVE, INACTIVE or REVOKED (final); takes effect at once", "update_certificate", True,
        (CERTIFICATE_ID, Arg("--new-status", required=True, choices=("ACTIVE", "INACTIVE", "REVOKED"))),
    ),
    Command(
        "describe-certificate", "DescribeCertificate",
        "one device certificate, with its PEM and transfer data", "describe_certificate", False,
        (CERTIFICATE_ID,), own=TRANSFER_OWN,
    ),
    Command(
        "list-certificates", "ListCertificates", "device certificates, newest first",
        "list_certificates", False, PAGING, paged=True,
    ),
    Command(
        "list-certificates-by-ca", "ListCertificatesByCA", "device certificates issued by one registered CA",
        "list_certificates", False,
        (Arg("--ca-certificate-id", param="ca_id", required=True), *PAGING), paged=True,
    ),
    Command(
        "delete-certificate", "DeleteCertificate", "remove a device certificate that is not ACTIVE",
        "delete_certificate", True,
        (CERTIFICATE_ID, Arg("--force-delete", Kind.BOOL,
                             help="accepted; nothing is ever attached to a sensor certificate here")),
    ),
    Command(
        "transfer-certificate", "TransferCertificate",
        "start moving an INACTIVE certificate to another gateway", "transfer_certificate", True,
        (
            CERTIFICATE_ID,
            Arg("--target-gateway", param="target", required=True, aws=False,
                help="the target gateway's thing name (AWS: --target-aws-account)"),
            Arg("--transfer-message", param="message"),
            Arg("--outfile", Kind.OUTFILE, required=True, help="the transfer bundle to carry to the target"),
        ),
        outputs={"--outfile": "bundle"}, own=("bundleFile",),
    ),
    Command(
        "accept-certificate-transfer", "AcceptCertificateTransfer",
        "on the target gateway: register a transferred certificate here; writes a reply file",
        "accept_certificate_transfer", True,
        (
            BUNDLE,
            SET_AS_ACTIVE,
            EXPECT_SIGNER,
            REPLY_OUTFILE,
        ),
        outputs={"--reply-outfile": "reply"},
        own=("certificateArn", "certificateId", "status", "previousOwnedBy", "signerCertificateId",
             "replyFile"),
    ),
    Command(
        "reject-certificate-transfer", "RejectCertificateTransfer",
        "on the target gateway: decline a transferred certificate; writes a reply file",
        "reject_certificate_transfer", False,
        (
            BUNDLE,
            Arg("--reject-reason"),
            EXPECT_SIGNER,
            REPLY_OUTFILE,
        ),
        outputs={"--reply-outfile": "reply"},
        own=("certificateId", "signerCertificateId", "replyFile"),
    ),
    Command(
        "cancel-certificate-transfer", "CancelCertificateTransfer",
        "on the source: end a pending transfer; the certificate is INACTIVE", "cancel_certificate_transfer",
        True, (CERTIFICATE_ID,),
    ),
    Command(
        "complete-certificate-transfer", "CompleteCertificateTransfer",
        "on the source: apply the target's reply", "complete_certificate_transfer", True,
        (Arg("--reply", Kind.PEM, param="reply_text", required=True), EXPECT_SIGNER),
        aws=False,
    ),
    Command(
        "describe-endpoint", "DescribeEndpoint",
        "the host name sensors connect to, the listeners and the CA they must trust", "describe_endpoint",
        False,
        (
            Arg("--endpoint-type", choices=("iot:Data-ATS", "iot:Data"),
                help="iot:Data-ATS or iot:Data (the same host name here)"),
            Arg("--ca-certificate-outfile", Kind.OUTFILE, aws=False,
                help="also write the CA certificate (PEM) here"),
        ),
        outputs={"--ca-certificate-outfile": "caCertificatePem"},
        own=("endpoints", "caCertificateId", "caCertificatePem"),
    ),
)  # fmt: skip

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}


# the control socket's keys of commands outside the table (gatewayctl trust update), and of paging
OTHER_FLAGS = {"mode": "--mode", "caFile": "--ca-file", "fromConfig": "--from-config"}
PAGING_FLAGS = {"marker": "--starting-token", "pageSize": "--page-size"}
_QUOTED_KEY = re.compile(r"'([a-z][A-Za-z]*)'")


def cli_wording(message: str, command: Command | None = None) -> str:
    """A daemon's message in the command line's words: each quoted control-socket key of the command
    ('newStatus') becomes its flag (--new-status). The daemon and the services word every message with the
    keys (AWS's API member names), so that clients of the control socket other than gatewayctl read their
    own words; gatewayctl alone speaks of flags."""
    flags = dict(OTHER_FLAGS) if command is None else {a.key: a.flag for a in command.args}
    if command is not None and command.paged:
        flags.update(PAGING_FLAGS)
    return _QUOTED_KEY.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


def check_value(arg: Arg, value: Any) -> str | None:
    """Why a control-socket value does not fit the argument's kind, or None."""
    match arg.kind:
        case Kind.BOOL:
            return None if isinstance(value, bool) else "must be true or false"
        case Kind.INT:
            ok = isinstance(value, int) and not isinstance(value, bool)
            return None if ok else "must be a whole number"
        case _:
            return None if isinstance(value, str) else "must be a string"
