"""Issue 18, point 1: the registry's command line as the AWS CLI's, from one table (gatewayd.core.commands).

The reference for shapes and exception names is botocore's `iot` service model, recorded in
tests/fixtures/aws_iot_registry_shapes.json (output members and declared errors of each operation, taken from
boto/botocore botocore/data/iot/2015-05-28/service-2.json). gatewayctl runs here in process against a state
directory with no daemon (its offline mode), which goes through the same RegistryService and command table
as the daemon's control socket.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.cli import gatewayctl
from gatewayd.core.commands import BY_NAME, COMMANDS, Kind
from gatewayd.core.errors import GatewaydError
from gatewayd.service.downstream.registry import RegistryService
from gatewayd.service.downstream.registry_commands import run_command
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.registry import Registry
from gatewayd_dev import pki
from gatewayd_dev.gateway import write_config

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "aws_iot_registry_shapes.json").read_text())
AWS = FIXTURE["operations"]
AWS_ERROR = re.compile(
    r"\nAn error occurred \((?P<name>\w+)\) when calling the (?P<operation>\w+) operation: (?P<message>.+)\n"
)


def test_every_command_of_the_table_is_an_aws_operation_with_its_flags() -> None:
    for command in COMMANDS:
        method = getattr(RegistryService, command.method)
        keywords = set(inspect.signature(method).parameters)
        for arg in command.args:
            if arg.kind is not Kind.OUTFILE:
                assert arg.keyword in keywords, (command.name, arg.flag)
        if command.aws:
            assert AWS[command.name]["operation"] == command.operation
            aws_inputs = set(AWS[command.name]["input"])
            for arg in command.args:  # every flag the table calls AWS's is a member of AWS's input
                if arg.aws and arg.kind is not Kind.OUTFILE and arg.flag != "--status":
                    assert arg.key in aws_inputs, (command.name, arg.flag)
    names = {c.name for c in COMMANDS}
    assert names >= {"delete-registration-code", "create-certificate-from-csr", "list-certificates-by-ca"}


def test_the_parser_is_made_from_the_table() -> None:
    parser = gatewayctl._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        sub = subparsers.choices[command.name]
        flags = {o for a in sub._actions for o in a.option_strings}
        for arg in command.args:
            assert (arg.flag in flags) == arg.cli, (command.name, arg.flag)
            if arg.kind is Kind.BOOL:
                assert f"--no-{arg.flag[2:]}" in flags
        if command.paged:
            assert {"--max-items", "--starting-token", "--no-paginate", "--page-size"} <= flags


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[RegistryService]:
    ca = LocalCA(tmp_path, "gw-1")
    ca.ensure()
    registry = Registry(tmp_path / "registry.db", "gw-1")
    yield RegistryService(registry, ca, "gw-1")
    registry.close()


def _paths(value: Any, prefix: str = "") -> set[str]:
    """Every dotted member path of a JSON value (list items under the list's own path)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found |= {path} | _paths(inner, path)
    elif isinstance(value, list):
        for inner in value:
            found |= _paths(inner, prefix)
    return found


def _check_shape(name: str, result: dict[str, Any]) -> None:
    """Every field is AWS's (botocore's output shape) or declared gatewayd's own in the table; dates are
    ISO 8601 with an offset, as the AWS CLI v2 prints timestamps."""
    aws = _paths(AWS[name]["output"])
    own = BY_NAME[name].own
    extra = {p for p in _paths(result) - aws if not any(p == o or p.startswith(f"{o}.") for o in own)}
    assert not extra, (name, extra)
    for path in _paths(result):
        leaf = _leaf(AWS[name]["output"], path.split("."))
        if leaf == "timestamp":
            for value in _values(result, path.split(".")):
                assert dt.datetime.fromisoformat(value).utcoffset() == dt.timedelta(0), (path, value)


def _leaf(shape: Any, parts: list[str]) -> Any:
    for part in parts:
        while isinstance(shape, list):
            shape = shape[0]
        if not isinstance(shape, dict) or part not in shape:
            return None
        shape = shape[part]
    return shape


def _values(value: Any, parts: list[str]) -> list[Any]:
    if not parts:
        return value if isinstance(value, list) else [value]
    if isinstance(value, list):
        return [v for item in value for v in _values(item, parts)]
    return _values(value[parts[0]], parts[1:]) if parts[0] in value else []


def _refused(svc: RegistryService, command: str, args: dict[str, Any], name: str) -> None:
    """The refusal carries AWS's exception name, one the operation declares in AWS's model."""
    with pytest.raises(GatewaydError) as caught:
        run_command(svc, command, args)
    assert caught.value.code == name, (command, caught.value)
    assert name in AWS[command]["errors"], (command, name)


def test_outputs_and_refusals_as_aws(svc: RegistryService, tmp_path: Path) -> None:
    out = run_command(svc, "create-keys-and-certificate", {"setAsActive": True, "commonName": "s-1"})
    _check_shape("create-keys-and-certificate", out)
    cid = out["certificateId"]
    desc = run_command(svc, "describe-certificate", {"certificateId": cid})
    _check_shape("describe-certificate", desc)
    d = desc["certificateDescription"]
    assert d["customerVersion"] == 1 and re.fullmatch(r"[0-9a-f-]{36}", d["generationId"])
    assert "previousOwnedBy" not in d  # AWS leaves out what it has no value for
    assert run_command(svc, "update-certificate", {"certificateId": cid, "newStatus": "INACTIVE"}) == {}
    again = run_command(svc, "describe-certificate", {"certificateId": cid})["certificateDescription"]
    assert again["customerVersion"] == 2 and again["generationId"] != d["generationId"]
    listed = run_command(svc, "list-certificates", {})
    _check_shape("list-certificates", listed)
    ca_id = d["caCertificateId"]
    _check_shape(
        "list-certificates-by-ca", run_command(svc, "list-certificates-by-ca", {"caCertificateId": ca_id})
    )
    _check_shape("list-ca-certificates", run_command(svc, "list-ca-certificates", {}))
    _check_shape(
        "describe-ca-certificate", run_command(svc, "describe-ca-certificate", {"certificateId": ca_id})
    )
    code = run_command(svc, "get-registration-code", {})
    _check_shape("get-registration-code", code)
    assert run_command(svc, "delete-registration-code", {}) == {}
    assert run_command(svc, "get-registration-code", {}) != code  # a new one
    _check_shape("describe-endpoint", run_command(svc, "describe-endpoint", {"endpointType": "iot:Data-ATS"}))
    key = pki.new_key("ecc")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "s-2")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    made = run_command(svc, "create-certificate-from-csr", {"certificateSigningRequest": csr})
    _check_shape("create-certificate-from-csr", made)
    plant = pki.make_root("Plant CA", "ecc")
    verification = pki.make_client(plant, run_command(svc, "get-registration-code", {})["registrationCode"])
    registered_ca = run_command(
        svc, "register-ca-certificate",
        {"caCertificate": plant.cert_pem().decode(),
         "verificationCertificate": verification.cert_pem().decode(),
         "setAsActive": True, "allowAutoRegistration": False},
    )  # fmt: skip
    _check_shape("register-ca-certificate", registered_ca)
    device = pki.make_client(plant, "plant-1").cert_pem().decode()
    reg = run_command(svc, "register-certificate", {"certificatePem": device, "setAsActive": True})
    _check_shape("register-certificate", reg)
    selfie = pki.make_self_signed_client("selfie").cert_pem().decode()
    _check_shape(
        "register-certificate-without-ca",
        run_command(svc, "register-certificate-without-ca", {"certificatePem": selfie}),
    )
    transfer = run_command(svc, "transfer-certificate", {"certificateId": cid, "targetGateway": "gw-2"})
    del transfer["bundle"]  # gatewayctl writes it to --outfile and prints bundleFile instead
    _check_shape("transfer-certificate", transfer)
    transferred = run_command(svc, "describe-certificate", {"certificateId": cid})
    _check_shape("describe-certificate", transferred)
    assert transferred["certificateDescription"]["transferData"]["transferDate"].endswith("+00:00")

    # refusals, each named as AWS names it
    _refused(svc, "describe-certificate", {"certificateId": "0" * 64}, "ResourceNotFoundException")
    _refused(svc, "describe-ca-certificate", {"certificateId": "0" * 64}, "ResourceNotFoundException")
    _refused(svc, "register-certificate", {"certificatePem": device}, "ResourceAlreadyExistsException")
    _refused(svc, "register-certificate", {"certificatePem": "junk"}, "CertificateValidationException")
    _refused(svc, "register-certificate-without-ca", {"certificatePem": plant.cert_pem().decode()},
             "CertificateValidationException")  # fmt: skip
    wrong = pki.make_client(plant, "not-the-code").cert_pem().decode()
    _refused(svc, "register-ca-certificate",
             {"caCertificate": pki.make_root("X", "ecc").cert_pem().decode(),
              "verificationCertificate": wrong},
             "RegistrationCodeValidationException")  # fmt: skip
    _refused(svc, "update-certificate",
             {"certificateId": reg["certificateId"], "newStatus": "PENDING_TRANSFER"},
             "InvalidRequestException")  # fmt: skip
    _refused(svc, "delete-certificate", {"certificateId": reg["certificateId"]}, "CertificateStateException")
    _refused(svc, "delete-ca-certificate", {"certificateId": registered_ca["certificateId"]},
             "CertificateStateException")  # fmt: skip
    _refused(
        svc, "update-certificate", {"certificateId": cid, "newStatus": "ACTIVE"}, "CertificateStateException"
    )
    run_command(svc, "cancel-certificate-transfer", {"certificateId": cid})
    _refused(svc, "cancel-certificate-transfer", {"certificateId": cid}, "TransferAlreadyCompletedException")
    run_command(svc, "delete-registration-code", {})
    _refused(svc, "delete-registration-code", {}, "ResourceNotFoundException")
    _refused(svc, "list-certificates", {"pageSize": 0}, "InvalidRequestException")
    _refused(svc, "list-certificates", {"pageSize": "ten"}, "InvalidRequestException")
    _refused(svc, "describe-certificate", {"certificateId": cid, "bogus": 1}, "InvalidRequestException")
    assert run_command(svc, "delete-certificate", {"certificateId": cid, "forceDelete": True}) == {}


# ------------------------------------------------------------------ gatewayctl itself, in process


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration whose daemon is not running: gatewayctl works on the state directory itself."""
    return write_config(
        tmp_path / "g.toml",
        {
            "gateway": {
                "thing_name": "gw-ctl",
                "state_dir": str(tmp_path / "state"),
                "control_socket": str(tmp_path / "control.sock"),
            },
            "upstream": {"endpoint": "example-ats.iot.eu-west-1.amazonaws.com"},
        },
    )


def ctl(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = gatewayctl.main(["--config", str(config), *args])
        except SystemExit as exc:  # argparse
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def test_gatewayctl_prints_and_exits_as_the_aws_cli(config: Path, tmp_path: Path) -> None:
    status, out, err = ctl(
        config, "create-keys-and-certificate", "--common-name", "c-1", "--no-set-as-active"
    )
    assert status == 0 and err == ""
    made = json.loads(out)
    assert out.startswith('{\n    "certificateArn"')  # the AWS CLI's layout: 4 spaces, AWS's member order
    cid = made["certificateId"]
    # a refusal: AWS's words on stderr, exit 254
    status, out, err = ctl(config, "describe-certificate", "--certificate-id", "0" * 64)
    error = AWS_ERROR.fullmatch(err)
    assert status == 254 and out == "" and error is not None, err
    assert error["name"] == "ResourceNotFoundException" and error["operation"] == "DescribeCertificate"
    # an operation AWS answers with nothing prints nothing
    assert ctl(config, "update-certificate", "--certificate-id", cid, "--new-status", "ACTIVE") == (0, "", "")
    # usage errors: 252
    status, out, err = ctl(config, "describe-certificate")
    assert status == 252 and "--certificate-id" in err and err.count("\n") == 1
    status, _, err = ctl(config, "describe-certificate", "--certificate-id", cid, "--no-such-flag")
    assert status == 252 and "unrecognized arguments" in err
    status, _, err = ctl(config, "register-certificate", "--certificate-pem", "file:///nonexistent.pem")
    assert status == 252 and "cannot read /nonexistent.pem" in err
    # the environment: an unusable configuration, 253
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    status, _, err = ctl(broken, "list-certificates")
    assert status == 253 and "cannot use" in err and "invalid TOML" in err
    # gatewayd's own commands keep their statuses (1, 2)
    status, _, _ = ctl(config, "status")
    assert status == 1


def test_pem_arguments_inline_file_url_or_path(config: Path, tmp_path: Path) -> None:
    selfie = pki.make_self_signed_client("inline-1").cert_pem().decode()
    status, out, err = ctl(config, "register-certificate-without-ca", "--certificate-pem", selfie)
    assert status == 0, err
    assert json.loads(out)["certificateId"]
    second = pki.write(tmp_path / "s2.pem", pki.make_self_signed_client("inline-2").cert_pem())
    for given in (f"file://{second}", str(second)):
        status, out, err = ctl(config, "register-certificate-without-ca", "--certificate-pem", given)
        if given.startswith("file://"):
            assert status == 0, err
        else:  # the same certificate again, read from the bare path: refused as a duplicate, so it was read
            assert status == 254 and "ResourceAlreadyExistsException" in err
    status, _, err = ctl(config, "register-certificate-without-ca", "--certificate-pem", "not a certificate")
    assert status == 254 and "CertificateValidationException" in err


def test_gatewayctl_pages_through_everything(config: Path) -> None:
    for i in range(7):
        assert ctl(config, "create-keys-and-certificate", "--common-name", f"p-{i}")[0] == 0
    status, out, _ = ctl(config, "list-certificates", "--page-size", "2")
    assert status == 0
    every = [c["certificateId"] for c in json.loads(out)["certificates"]]
    assert len(every) == 7 == len(set(every))
    status, out, _ = ctl(config, "list-certificates", "--max-items", "3", "--page-size", "2")
    first = json.loads(out)
    assert [c["certificateId"] for c in first["certificates"]] == every[:3] and "NextToken" in first
    status, out, _ = ctl(config, "list-certificates", "--starting-token", first["NextToken"])
    assert [c["certificateId"] for c in json.loads(out)["certificates"]] == every[3:]
    status, out, _ = ctl(config, "list-certificates", "--no-paginate", "--page-size", "5")
    raw = json.loads(out)
    assert len(raw["certificates"]) == 5 and "nextMarker" in raw and "NextToken" not in raw
