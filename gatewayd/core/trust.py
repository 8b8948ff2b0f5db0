"""Which root CAs the uplink trusts, by validation mode, and when to warn before one expires.

AWS IoT Core's ATS endpoints chain to Amazon Root CA 1 (RSA 2048) or Amazon Root CA 3 (ECC P-256); roots 2
(RSA 4096) and 4 (ECC P-384) are AWS's reserved successors (AWS IoT developer guide, "Server
authentication"). Roots are chosen by pinned SHA-256 fingerprint, never by file name.

Starfield Services Root CA G2 is in no mode. AWS cross-signs the Amazon roots with it for TLS stacks that must
reach that older root; OpenSSL, which gatewayd uses on every supported Debian, ends the chain at the first
trusted certificate, so a cross-signed chain validates against the Amazon root alone (tests prove it).
Trusting Starfield as well would only widen what the gateway accepts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

MODES = ("rsa", "ecc", "all", "legacy", "custom")
FILE_MODES = ("legacy", "custom")  # modes whose trust comes from upstream.ca_file only


@dataclass(frozen=True)
class Root:
    name: str  # the certificate's subject common name
    sha256: str  # fingerprint of the DER, lowercase hex
    algorithm: str


@dataclass(frozen=True)
class Catalog:
    """The roots each mode selects. AMAZON is the real one; tests substitute the stand-in's roots."""

    roots: tuple[Root, ...]
    modes: dict[str, tuple[str, ...]]  # mode -> root names
    origin: str = "built-in Amazon Trust Services pins"

    def roots_for(self, mode: str) -> tuple[Root, ...]:
        names = self.modes.get(mode, ())
        return tuple(r for r in self.roots if r.name in names)


AMAZON = Catalog(
    roots=(
        Root(
            "Amazon Root CA 1", "8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e", "RSA 2048"
        ),
        Root(
            "Amazon Root CA 2", "1ba5b2aa8c65401a82960118f80bec4f62304d83cec4713a19c39c011ea46db4", "RSA 4096"
        ),
        Root(
            "Amazon Root CA 3",
            "18ce6cfe7bf14e60b2e347b8dfe868cb31d02ebb3ada271569f50343b46db3a4",
            "ECC P-256",
        ),
        Root(
            "Amazon Root CA 4",
            "e35d28419ed02025cfa69038cd623962458da5c695fbdea3c22b0bfb25897092",
            "ECC P-384",
        ),
    ),
    modes={
        "rsa": ("Amazon Root CA 1", "Amazon Root CA 2"),
        "ecc": ("Amazon Root CA 3", "Amazon Root CA 4"),
        "all": ("Amazon Root CA 1", "Amazon Root CA 2", "Amazon Root CA 3", "Amazon Root CA 4"),
    },
)

# Known and deliberately excluded (see the module docstring); pinned so tests can show it stays out.
STARFIELD_SERVICES_G2 = Root(
    "Starfield Services Root Certificate Authority - G2",
    "568d6905a2c88708a4b3025190edcfedb1974a606a13c6e5290fcb2ae63edab5",
    "RSA 2048",
)


@dataclass(frozen=True)
class ExpiryWarning:
    name: str
    not_after: dt.datetime
    days_left: float


def expiry_warnings(
    roots: list[tuple[str, dt.datetime]], now: dt.datetime, warn_days: int
) -> list[ExpiryWarning]:
    """Roots that expire within `warn_days` of `now` (or already have), soonest first."""
    horizon = now + dt.timedelta(days=warn_days)
    found = [
        ExpiryWarning(name, not_after, round((not_after - now).total_seconds() / 86400, 1))
        for name, not_after in roots
        if not_after <= horizon
    ]
    return sorted(found, key=lambda w: w.not_after)
