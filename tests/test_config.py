"""Configuration: valid files, each kind of error, all errors at once, drop-in order, the reference file."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.core.config import Config, diff, leaves, validate, with_live_changes
from gatewayd.core.errors import ConfigError
from gatewayd.stores.configfile import load

from .conftest import REPO

MINIMAL = """
[gateway]
thing_name = "gw-1"
[upstream]
endpoint = "abc123-ats.iot.eu-west-1.amazonaws.com"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(path)
    return [str(p) for p in err.value.problems]


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path / "g.toml", MINIMAL))
    assert config.gateway.thing_name == "gw-1"
    assert config.upstream.endpoint == "abc123-ats.iot.eu-west-1.amazonaws.com"
    assert config.upstream.port == 8883
    assert config.gateway.state_dir == "/var/lib/gatewayd"
    assert config.gateway.control_socket == "/run/gatewayd/control.sock"
    assert config.logging.level == "info"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path / "g.toml", MINIMAL))
    with pytest.raises(AttributeError):
        config.upstream.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[upstream]\nprot = 8883", "upstream.prot: unknown key"),
        ("[uplink]\nport = 1", "uplink: unknown section"),
        ('[upstream]\nport = "8883"', "upstream.port: expected an integer, got string '8883'"),
        ("[upstream]\nport = true", "upstream.port: expected an integer, got boolean true"),
        ("[upstream]\nport = 70000", "upstream.port: must be at most 65535, got 70000"),
        ("[upstream]\nport = 0", "upstream.port: must be at least 1, got 0"),
        (
            '[logging]\nlevel = "verbose"',
            "logging.level: 'verbose' is not one of: debug, info, warning, error",
        ),
        ('[gateway]\nstate_dir = "var/lib"', "gateway.state_dir: must be an absolute path"),
        ("logging = 3", "logging: expected a table, got integer 3"),
    ],
)
def test_each_kind_of_error_names_file_and_key(tmp_path: Path, extra: str, expected: str) -> None:
    main = write(tmp_path / "g.toml", MINIMAL)
    dropin = write(tmp_path / "g.toml.d" / "50-x.toml", extra)
    assert problems(main) == [f"{dropin}:{expected}"]


def test_bad_thing_name_and_endpoint(tmp_path: Path) -> None:
    main = write(
        tmp_path / "g.toml",
        '[gateway]\nthing_name = "gw 1"\n[upstream]\nendpoint = "-bad-.example.com"\n',
    )
    assert problems(main) == [
        f"{main}:gateway.thing_name: must be 1-128 characters of letters, digits, ':', '_' or '-' "
        "(AWS IoT thing name rules)",
        f"{main}:upstream.endpoint: '-bad-.example.com' is not a valid DNS host name",
    ]


def test_missing_required_keys_are_each_reported(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", "[logging]\nlevel = 'debug'\n")
    assert problems(main) == [
        f"{main}:gateway.thing_name: required key is missing",
        f"{main}:upstream.endpoint: required key is missing",
    ]


def test_three_mistakes_give_three_lines_and_exit_1(tmp_path: Path) -> None:
    main = write(
        tmp_path / "g.toml",
        MINIMAL + '\n[logging]\nlevel = "loud"\nextra = 1\n',
    )
    write(tmp_path / "g.toml.d" / "10-port.toml", '[upstream]\nport = "high"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayd", "check-config", "--config", str(main)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert f"{main}:logging.level: 'loud' is not one of: debug, info, warning, error" in lines
    assert f"{main}:logging.extra: unknown key" in lines
    assert (
        f"{tmp_path / 'g.toml.d' / '10-port.toml'}:upstream.port: expected an integer, got string 'high'"
        in lines
    )
    assert result.stdout == ""


def test_toml_syntax_error_and_unreadable_file(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", MINIMAL)
    bad = write(tmp_path / "g.toml.d" / "20-bad.toml", "[upstream\nport = 1\n")
    found = problems(main)
    assert len(found) == 1 and found[0].startswith(f"{bad}: invalid TOML: ")
    assert "line 1" in found[0]
    assert problems(tmp_path / "absent.toml") == [
        f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    main = tmp_path / "g.toml"
    main.write_bytes(b"[gateway]\nthing_name = '\xff'\n")
    (found,) = problems(main)
    assert found.startswith(f"{main}: not UTF-8 text")


def test_dropins_override_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", MINIMAL)
    d = tmp_path / "g.toml.d"
    write(d / "50-site.toml", "[upstream]\nport = 443\n[logging]\nlevel = 'warning'\n")
    write(
        d / "10-fleet.toml", "[upstream]\nport = 8443\nendpoint = 'fleet-ats.iot.us-east-1.amazonaws.com'\n"
    )
    write(d / "90-ignored.conf", "[upstream]\nport = 1\n")  # not .toml: ignored
    write(d / "70-old.toml.dpkg-old", "[upstream]\nport = 2\n")  # not .toml: ignored
    config = load(main)
    assert config.upstream.port == 443  # 50-site after 10-fleet
    assert config.upstream.endpoint == "fleet-ats.iot.us-east-1.amazonaws.com"  # from 10-fleet
    assert config.logging.level == "warning"
    assert config.gateway.thing_name == "gw-1"  # main file, untouched by drop-ins


def test_dropin_value_replacing_a_bad_one_clears_the_problem(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", MINIMAL + "[logging]\nlevel = 'loud'\n")
    write(tmp_path / "g.toml.d" / "10-fix.toml", "[logging]\nlevel = 'error'\n")
    assert load(main).logging.level == "error"


def test_dropin_can_supply_required_keys(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", "[logging]\nlevel = 'info'\n")
    write(tmp_path / "g.toml.d" / "10.toml", MINIMAL)
    assert load(main).gateway.thing_name == "gw-1"


def test_check_config_ok_output(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", MINIMAL)
    write(tmp_path / "g.toml.d" / "10.toml", "[upstream]\nport = 443\n")
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayd", "check-config", "--config", str(main)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{main}: OK (1 drop-in)"


# ---------------------------------------------------------------- the reference file


REFERENCE = REPO / "config" / "gatewayd.toml"


def test_reference_config_is_valid() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayd", "check-config", "--config", str(REFERENCE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def _reference_entries() -> dict[str, tuple[str, str]]:
    """dotted key -> (value text, the comment block just above it), commented-out keys included.

    An array of tables (#[[section.name]] followed by #key = value lines) becomes one entry whose value text
    is a TOML inline array holding that one table.
    """
    entries: dict[str, tuple[str, str]] = {}
    section, comments, array, array_comment = "", [], "", ""
    items: list[str] = []
    for line in REFERENCE.read_text().splitlines():
        if m := re.fullmatch(r"#\[\[([\w.]+)\]\]", line):
            array, array_comment, items = m.group(1), " ".join(comments), []
        elif array and (m := re.fullmatch(r"#(\w+) = (.+)", line)):
            items.append(f"{m.group(1)} = {m.group(2)}")
            assert comments, f"{array}.{m.group(1)} has no explanation"
            comments = []
            entries[array] = ("[{" + ", ".join(items) + "}]", array_comment)
        elif m := re.fullmatch(r"\[([\w.]+)\]", line):
            section, comments, array = m.group(1), [], ""
        elif m := re.fullmatch(r"#?(\w+) = (.+)", line):
            entries[f"{section}.{m.group(1)}"] = (m.group(2), " ".join(comments))
            comments = []
        elif line.startswith("# "):
            comments.append(line[2:])
        elif not line.strip():
            comments = []  # a blank line ends a key's comment block
    return entries


def test_reference_documents_every_key_with_its_default_and_reload_kind() -> None:
    import tomllib

    config = load(REFERENCE)
    entries = _reference_entries()
    schema = leaves(config)
    assert set(entries) == set(schema), "reference file and schema disagree on the set of keys"
    for key, (value_text, comment) in entries.items():
        value, spec = schema[key]
        assert comment, f"{key} has no explanation"
        if spec.live:
            assert "Live." in comment, f"{key} is live but not documented as such"
        else:
            assert "Needs a restart." in comment, f"{key} needs a restart but is not documented as such"
        if "The default is none" in comment:  # an array of tables shown by example: the example must be valid
            assert value == (), f"{key}: documented as empty by default, code default is {value!r}"
            section, name = key.rsplit(".", 1)
            example = tomllib.loads(f"v = {value_text}")["v"]
            doc = tomllib.loads(MINIMAL)
            doc.setdefault(section, {})[name] = example
            built = validate(doc, {}, "reference example")
            assert getattr(getattr(built, section), name), f"{key}: the example is not valid"
        elif "REQUIRED" not in comment:
            default = tomllib.loads(f"v = {value_text}")["v"]
            if isinstance(default, list) and default and isinstance(default[0], dict):
                value = [dataclasses.asdict(v) for v in value]  # an array of tables: compare as dicts
            elif isinstance(default, list):
                default = tuple(default)
            elif isinstance(default, dict):  # a table of strings
                default = tuple(sorted(default.items()))
            assert default == value, f"{key}: reference shows {default!r}, code default is {value!r}"


# ---------------------------------------------------------------- reload support (pure)


def test_diff_marks_live_and_restart_keys(tmp_path: Path) -> None:
    old: Config = load(write(tmp_path / "g.toml", MINIMAL))
    new = load(write(tmp_path / "n.toml", MINIMAL.replace("gw-1", "gw-2") + "[logging]\nlevel = 'debug'\n"))
    changes = {c.key: c for c in diff(old, new)}
    assert set(changes) == {"logging.level", "gateway.thing_name"}
    assert changes["logging.level"].live and not changes["gateway.thing_name"].live
    applied = with_live_changes(old, new)
    assert applied.logging.level == "debug"
    assert applied.gateway.thing_name == "gw-1"  # restart-only: kept
    assert diff(old, old) == []


def test_listener_rules(tmp_path: Path) -> None:
    def listeners(*items: str) -> list[str]:
        text = MINIMAL + "".join(f"[[downstream.listener]]\n{item}\n" for item in items)
        try:
            load(write(tmp_path / "l.toml", text))
        except ConfigError as exc:
            return [str(p) for p in exc.problems]
        return []

    main = tmp_path / "l.toml"
    assert listeners('address = "127.0.0.1"\nport = 1883\ntls = false\nrequire_client_cert = false') == []
    assert listeners('address = "unix:/run/gw.sock"\ntls = false\nrequire_client_cert = false') == []
    assert listeners('address = "0.0.0.0"\ntls = false\nrequire_client_cert = false') == [
        f"{main}:downstream.listener: listener[0]: plain MQTT on 0.0.0.0 would expose sensors' traffic; "
        "use tls, a loopback address, or allow_insecure = true"
    ]
    assert (
        listeners('address = "0.0.0.0"\ntls = false\nrequire_client_cert = false\nallow_insecure = true')
        == []
    )
    assert listeners('address = "0.0.0.0"\nrequire_client_cert = false') == [
        f"{main}:downstream.listener: listener[0]: without client certificates on 0.0.0.0, sensors bypass "
        "the registry; use require_client_cert = true, a loopback address, or allow_insecure = true"
    ]
    assert listeners('address = "::1"\nrequire_client_cert = false') == []
    assert listeners('address = "::"\ntls = false') == [
        f"{main}:downstream.listener: listener[0]: require_client_cert needs tls = true"
    ]
    assert listeners("port = 8883", "port = 8883") == [
        f"{main}:downstream.listener: listener[1]: 0.0.0.0 port 8883 is configured twice"
    ]
    assert listeners('address = "eth0"\nport = 0') == [
        f"{main}:downstream.listener[0].address: 'eth0' is not an IP address",
        f"{main}:downstream.listener[0].port: must be at least 1, got 0",
    ]
    assert listeners("adress = '1.2.3.4'") == [f"{main}:downstream.listener[0].adress: unknown key"]


def test_policy_and_forwarding_are_validated(tmp_path: Path) -> None:
    main = write(
        tmp_path / "p.toml",
        MINIMAL
        + '[downstream.policy]\npublish = ["sensors/${iot:Nope}/#"]\nsubscribe = ["a/#/b"]\n'
        + '[forwarding]\nupstream_topic = "${topic}/suffix"\n',
    )
    found = problems(main)
    assert len(found) == 3, found
    assert found[0].startswith(
        f"{main}:downstream.policy.publish: 'sensors/${{iot:Nope}}/#': unknown variable"
    )
    assert found[1].startswith(f"{main}:downstream.policy.subscribe: 'a/#/b' is not a valid topic filter")
    assert (
        found[2]
        == f"{main}:forwarding.upstream_topic: the upstream topic template must end with ${{topic}}, once"
    )


def test_renewal_section(tmp_path: Path) -> None:
    good = load(
        write(
            tmp_path / "r.toml",
            MINIMAL + '[renewal]\nissuer = "aws-fleet-provisioning"\ntemplate_name = "GatewayTemplate"\n'
            'parameters = { SerialNumber = "0042", Site = "barn" }\nrenew_before = "30d"\n',
        )
    )
    assert good.renewal.parameters == (("SerialNumber", "0042"), ("Site", "barn"))
    assert good.renewal.renew_before == "30d"
    main = write(
        tmp_path / "bad.toml",
        MINIMAL + '[renewal]\nissuer = "command"\nrenew_before = "100%"\nretry_interval = "soon"\n'
        "parameters = { n = 1 }\n",
    )
    assert problems(main) == [
        f"{main}:renewal.parameters: expected a table of strings, got a table",
        f"{main}:renewal.renew_before: '100%': a share must be between 0% and 100% (exclusive), like 33%",
        f"{main}:renewal.retry_interval: 'soon' is not a duration like 30d, 12h, 90m or 45s",
        f'{main}:renewal.command: required when issuer is "command"',
    ]
    relative = write(
        tmp_path / "rel.toml", MINIMAL + '[renewal]\nissuer = "command"\ncommand = ["issue.sh"]\n'
    )
    assert problems(relative) == [
        f"{relative}:renewal.command: the command must be an absolute path, not 'issue.sh'"
    ]
    fleet = write(tmp_path / "f.toml", MINIMAL + '[renewal]\nissuer = "aws-fleet-provisioning"\n')
    assert problems(fleet) == [
        f'{fleet}:renewal.template_name: required when issuer is "aws-fleet-provisioning"'
    ]
