"""Topic templates with policy variables such as ${gateway:ThingName} (AWS IoT policy variable syntax)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from gatewayd.core.errors import TemplateError

_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def expand(template: str, variables: Mapping[str, str]) -> str:
    """Replace every ${name}; an unknown name or an unclosed ${ is an error, never left in place."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join("${" + n + "}" for n in sorted(variables))
            raise TemplateError(f"unknown variable ${{{name}}} (known: {known})")
        return variables[name]

    result = _VARIABLE.sub(one, template)
    if "${" in result:
        raise TemplateError("unclosed ${ in template")
    return result
