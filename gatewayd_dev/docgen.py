"""Generate the documentation pages that are derived from the code: `python -m gatewayd_dev.docgen`.

docs/messages.md and the journald message catalog systemd/gatewayd.catalog (installed by the package to
/usr/lib/systemd/catalog/, shown by `journalctl -x`) come from gatewayd.core.logevents; the man page
man/gatewayd.toml.5 comes from the commented reference config/gatewayd.toml, man/gatewayctl.8's registry
commands from the command table gatewayd.core.commands, and the bash completion completion/gatewayctl.bash
from gatewayctl's argument parser (itself made from that table). A test fails when a committed file
differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gatewayd.core import logevents
from gatewayd.core.commands import COMMANDS, Command, Kind

REPO = Path(__file__).resolve().parent.parent

HEADER = """\
# Journal messages (MESSAGE_ID)

Every event an operator may alert on carries a stable `MESSAGE_ID` in the journal. The ids are defined in one
place, `gatewayd/core/logevents.py`, and never change once released. This page is generated from that module
(`python -m gatewayd_dev.docgen`); a test keeps it in step.

    journalctl -u gatewayd MESSAGE_ID=5433ee6686064fe093cd41e0cf6789c5     # invalid configuration at start
    journalctl -u gatewayd -o json | jq 'select(.MESSAGE_ID != null)'

Every gatewayd record also carries `SYSLOG_IDENTIFIER=gatewayd`, `GATEWAYD_COMPONENT` (the part of the daemon
that logged it: `daemon`, `control`, `uplink`, `upstream`, `identity`, ...), `PRIORITY`, and
`CODE_FILE`/`CODE_LINE`/`CODE_FUNC`. An event's own fields are named `GATEWAYD_<NAME>` and listed below.
"""


def messages_md() -> str:
    out = [HEADER]
    for m in logevents.ALL:
        out += [
            f"## {m.name}",
            "",
            f"- id: `{m.id}`",
            f"- priority {m.priority.value} ({m.priority.name.lower()})",
            f"- fields: {m.fields or 'none'}",
            "",
            m.summary,
            "",
        ]
        if m.action:
            out += [f"**What to do:** {m.action}", ""]
    return "\n".join(out)


CATALOG_HEADER = """\
# journald message catalog for gatewayd, generated from gatewayd/core/logevents.py by
# `python -m gatewayd_dev.docgen`; do not edit. Installed to /usr/lib/systemd/catalog/gatewayd.catalog;
# `journalctl -x` shows the entry below each message that carries its MESSAGE_ID.
"""


def catalog() -> str:
    """The catalog in journald's format (see `man journalctl`, --update-catalog): one entry per MESSAGE_ID."""
    out = [CATALOG_HEADER]
    for m in logevents.ALL:
        text = m.summary
        if m.action:
            text += "\n\nWhat to do: " + m.action
        if m.fields:
            text += "\n\nFields: " + m.fields
        out += [
            f"-- {m.id}",
            f"Subject: {m.name}",
            "Defined-By: gatewayd",
            "Documentation: man:gatewayd(8)",
            "Documentation: file:///usr/share/doc/gatewayd/messages.md",
            "",
            text,
            "",
        ]
    return "\n".join(out)


KEY_LINE = re.compile(r"#?([a-z_]+) = (.*)")


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def config_man() -> str:
    """gatewayd.toml(5): the reference config's comments, table by table and key by key."""
    out = [
        '.TH GATEWAYD.TOML 5 "" "gatewayd" "File Formats"',
        '.\\" Generated from config/gatewayd.toml by `python -m gatewayd_dev.docgen`; do not edit.',
        ".SH NAME",
        "gatewayd.toml \\- configuration of gatewayd(8)",
        ".SH SYNOPSIS",
        "/etc/gatewayd/gatewayd.toml, /etc/gatewayd/gatewayd.toml.d/*.toml",
        ".SH DESCRIPTION",
    ]
    text: list[str] = []

    def flush(macro: str = ".PP") -> None:
        if not text:
            return
        if macro:
            out.append(macro)
        verbatim = False
        for line in text:
            indented = line.startswith("  ") or "   " in line  # aligned text stays as it is
            if indented != verbatim:
                out.append(".nf" if indented else ".fi")
                verbatim = indented
            out.append(_roff(line.strip() if not indented else line))
        if verbatim:
            out.append(".fi")
        text.clear()

    lines = (REPO / "config" / "gatewayd.toml").read_text().splitlines()
    in_options = False
    for raw in lines:
        line = raw.rstrip()
        if not line:
            flush()
        elif line.startswith("[") or line.startswith("#["):
            flush()
            if line.startswith("["):
                if not in_options:
                    out.append(".SH KEYS")
                    in_options = True
                out.append(f".SS {_roff(line)}")
            else:
                out += [".PP", f"Example table: \\fB{_roff(line[1:])}\\fR"]
        elif m := KEY_LINE.fullmatch(line):
            out += [".TP", f"\\fB{m.group(1)}\\fR = {_roff(m.group(2))}"]
            flush(macro="")
        elif line == "#":
            flush()
        elif line.startswith("# "):
            text.append(line[2:])
        else:
            raise ValueError(f"config/gatewayd.toml: unexpected line {line!r}")
    flush()
    out += [
        ".SH SEE ALSO",
        "gatewayd(8), gatewayctl(8), /usr/share/doc/gatewayd/configuration.md (the manual's page on the",
        "configuration; README.md beside it leads to the others)",
        "",
    ]
    return "\n".join(out)


def _man_synopsis(command: Command) -> str:
    parts = []
    for arg in command.args:
        if not arg.cli:
            continue
        value = {Kind.BOOL: "", Kind.INT: " N", Kind.PEM: " TEXT|file://PATH", Kind.OUTFILE: " PATH"}.get(
            arg.kind, " " + arg.flag[2:].upper().replace("-", "_")
        )
        words = f"{arg.flag}{value}"
        parts.append(words if arg.required else f"[{words}]")
    if command.paged:
        parts += ["[--max-items N]", "[--starting-token TOKEN]", "[--no-paginate]"]
    return " ".join(parts)


def gatewayctl_man() -> str:
    """gatewayctl(8): man/gatewayctl.8.in, with one entry per registry command of gatewayd.core.commands."""
    out = []
    for command in COMMANDS:
        out += [".TP", f".B {_roff(command.name)}"]
        if _man_synopsis(command):
            out += [_roff(_man_synopsis(command)), ".br"]
        own = "" if command.aws else " (gatewayd's own: AWS moves certificates between accounts differently)"
        out.append(_roff(f"{command.help[0].upper()}{command.help[1:]}.{own}"))
        if command.aws:
            out.append(_roff(f"AWS: {command.operation}."))
    template = (REPO / "man" / "gatewayctl.8.in").read_text()
    header = [
        '.TH GATEWAYCTL 8 "" "gatewayd" "System Administration"',
        '.\\" Generated from man/gatewayctl.8.in and gatewayd.core.commands by gatewayd_dev.docgen.',
    ]
    return "\n".join(header) + "\n" + template.replace("@REGISTRY_COMMANDS@\n", "\n".join(out) + "\n")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's visible subcommands (those its --help lists), in order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shown = {a.dest for a in action._choices_actions}
            return {name: sub for name, sub in action.choices.items() if name in shown}
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _words(parser: argparse.ArgumentParser, extra: list[str] | None = None) -> str:
    """One case's assignments: the words to offer, and files=1 when the command takes a file argument."""
    positional = any(not a.option_strings and a.dest != argparse.SUPPRESS for a in parser._actions)
    files = " files=1" if positional and not _subcommands(parser) else ""
    return f'words="{" ".join([*_options(parser), *(extra or [])])}"{files}'


PATH_OPTIONS = (
    "--socket|--config|--out|--chain|--ca-file|*-outfile|--ca-certificate|--certificate-pem|"
    "--ca-certificate-pem|--verification-certificate|--certificate-signing-request|--bundle|--reply"
)


def bash_completion() -> str:
    """Bash completion for gatewayctl: subcommands, actions and options, from its argument parser."""
    from gatewayd.cli.gatewayctl import _parser

    top = _parser()
    cases = [f'        "/") {_words(top, list(_subcommands(top)))} ;;']
    for name, sub in _subcommands(top).items():
        actions = _subcommands(sub)
        if actions:
            cases.append(f'        "{name}/") {_words(sub, list(actions))} ;;')
            for action, leaf in actions.items():
                cases.append(f'        "{name}/{action}"*) {_words(leaf)} ;;')
        else:
            cases.append(f'        "{name}/"*) {_words(sub)} ;;')
    return "\n".join(
        [
            "# bash completion for gatewayctl, generated from its argument parser by",
            "# `python -m gatewayd_dev.docgen`; do not edit.",
            "_gatewayctl() {",
            "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}",
            '    local cmd="" action="" words="" files="" i',
            "    case $prev in",
            f"        {PATH_OPTIONS})",
            '            COMPREPLY=($(compgen -f -- "$cur"))',
            "            return ;;",
            "    esac",
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            "        case ${COMP_WORDS[i]} in",
            "            --socket | --config) ((i++)) ;;",
            "            -*) ;;",
            "            *)",
            "                if [[ -z $cmd ]]; then cmd=${COMP_WORDS[i]}",
            "                elif [[ -z $action ]]; then action=${COMP_WORDS[i]}; fi ;;",
            "        esac",
            "    done",
            '    case "$cmd/$action" in',
            *cases,
            "    esac",
            '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            '    if [[ -n $files && $cur != -* ]]; then COMPREPLY+=($(compgen -f -- "$cur")); fi',
            "}",
            "complete -F _gatewayctl gatewayctl",
            "",
        ]
    )


def main() -> int:
    (REPO / "docs" / "messages.md").write_text(messages_md())
    (REPO / "systemd" / "gatewayd.catalog").write_text(catalog())
    (REPO / "man" / "gatewayd.toml.5").write_text(config_man())
    (REPO / "completion" / "gatewayctl.bash").write_text(bash_completion())
    (REPO / "man" / "gatewayctl.8").write_text(gatewayctl_man())
    return 0


if __name__ == "__main__":
    sys.exit(main())
