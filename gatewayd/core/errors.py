"""The one exception tree of gatewayd. Every error the project raises derives from GatewaydError."""

from __future__ import annotations

from dataclasses import dataclass


class GatewaydError(Exception):
    """Root of every error gatewayd raises on purpose.

    `code`: AWS's exception name where the error mirrors an AWS IoT one (the registry's commands, which
    gatewayctl prints as the AWS CLI does); empty otherwise."""

    code = ""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the configuration, located by file and dotted key."""

    file: str
    key: str  # dotted key ("upstream.port"); empty when the problem concerns the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"


class ConfigError(GatewaydError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class ControlError(GatewaydError):
    """A control-socket request failed (bad request, refused, or the daemon is unreachable); `code` is the
    daemon's error name when it gave one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TPMError(GatewaydError):
    """A TPM operation failed; the message names the operation and the TPM's response."""


class TPMUnavailable(TPMError):
    """The TPM cannot be reached through the configured TCTI (absent device, resource manager down)."""
