"""Generate the documentation pages that are derived from the code: `python -m gatewayd_dev.docgen`.

docs/messages.md comes from gatewayd.core.messages; a test fails when the committed page differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gatewayd.core import messages

REPO = Path(__file__).resolve().parent.parent

HEADER = """\
# Journal messages (MESSAGE_ID)

Every event an operator may alert on carries a stable `MESSAGE_ID` in the journal. The ids are defined in one
place, `gatewayd/core/messages.py`, and never change once released. This page is generated from that module
(`python -m gatewayd_dev.docgen`); a test keeps it in step.

    journalctl -u gatewayd MESSAGE_ID=5433ee6686064fe093cd41e0cf6789c5     # invalid configuration at start
    journalctl -u gatewayd -o json | jq 'select(.MESSAGE_ID != null)'

Every gatewayd record also carries `SYSLOG_IDENTIFIER=gatewayd`, `GATEWAYD_COMPONENT` (the part of the daemon
that logged it: `daemon`, `control`, `uplink`, `upstream`, `identity`, ...), `PRIORITY`, and
`CODE_FILE`/`CODE_LINE`/`CODE_FUNC`. An event's own fields are named `GATEWAYD_<NAME>` and listed below.
"""


def messages_md() -> str:
    out = [HEADER]
    for m in messages.ALL:
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


def main() -> int:
    (REPO / "docs" / "messages.md").write_text(messages_md())
    return 0


if __name__ == "__main__":
    sys.exit(main())
