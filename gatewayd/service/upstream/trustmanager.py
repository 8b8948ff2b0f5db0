"""The CA bundle the uplink verifies AWS IoT Core with: built at start from the validation mode, watched for
roots near expiry, and replaced by `gatewayctl trust update` only after a trial connection proved it
(service/upstream/switchover.py). The bundle's files are in stores/truststore.py, the Amazon root pins in
core/trust.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.errors import TrustError
from gatewayd.core.timefmt import iso_utc
from gatewayd.core.trust import AMAZON, FILE_MODES, MODES, expiry_warnings
from gatewayd.service.upstream.switchover import Refused, switch_over
from gatewayd.service.upstream.uplink import ChildSpec, Uplink
from gatewayd.stores import atomic, truststore

log = logging.getLogger("gatewayd.upstream")

LiveSpec = Callable[[Path], ChildSpec | None]  # a CA bundle -> how the live identity would connect with it


def build_trust(config: Config) -> truststore.TrustBundle:
    """The CA bundle for the validation mode (a TrustError stops the daemon at start); a mode set with
    `gatewayctl trust update` (STATE_DIR/trust/override.json) takes precedence over the config's."""
    up = config.upstream
    state_dir = Path(config.gateway.state_dir)
    override = truststore.read_override(state_dir)
    mode, ca_file = (up.validation_mode, up.ca_file) if override is None else override
    if override is not None and override != (
        up.validation_mode,
        up.ca_file if up.validation_mode in FILE_MODES else "",
    ):
        log.warning(
            "trust: using validation mode %s%s set by `gatewayctl trust update` instead of the config's %s; "
            "`gatewayctl trust update --from-config` returns to the config",
            mode, f" ({ca_file})" if ca_file else "", up.validation_mode,
        )  # fmt: skip
    catalog = truststore.catalog_from_env(AMAZON)
    if catalog is not AMAZON:
        log.warning(
            "using %s instead of the Amazon root pins",
            catalog.origin,
            extra=logevents.extra(logevents.DEV_TRUST_CATALOG),
        )
    if mode == "legacy":
        log.warning(
            "validation_mode legacy: trusting %s; AWS no longer supports legacy endpoints",
            ca_file,
            extra=logevents.extra(logevents.LEGACY_TRUST),
        )
    return truststore.build(
        mode, catalog, Path(up.system_ca_bundle), Path(ca_file) if mode in FILE_MODES else None, state_dir
    )


class TrustManager:
    def __init__(
        self,
        config: Config,
        bundle: truststore.TrustBundle,
        uplink: Uplink,
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.uplink = uplink
        self.clock_trusted = clock_trusted
        self.root_warnings: list[dict[str, Any]] = []

    def configure(self, config: Config) -> None:
        self.config = config
        self.check_roots()

    def check_roots(self) -> None:
        """Warn of trusted roots near expiry, by a synchronized clock only (checked again once it is)."""
        if not self.clock_trusted():
            self.root_warnings = []
            return
        now = dt.datetime.now(dt.UTC)
        found = expiry_warnings(
            truststore.root_expiries(self.bundle), now, self.config.upstream.root_expiry_warning_days
        )
        self.root_warnings = [
            {"root": w.name, "notAfter": iso_utc(w.not_after), "daysLeft": w.days_left} for w in found
        ]
        for w in found:
            log.warning(
                "trusted root %s expires at %s (%s days): update ca-certificates, or "
                "`gatewayctl trust update --mode M` to a mode whose roots are current",
                w.name,
                iso_utc(w.not_after),
                w.days_left,
                extra=logevents.extra(
                    logevents.TRUST_ROOT_EXPIRING,
                    root=w.name,
                    not_after=iso_utc(w.not_after),
                    days_left=w.days_left,
                ),
            )

    async def run(self) -> None:
        """Looks at the roots' dates once a day."""
        while True:
            await asyncio.sleep(86400)
            self.check_roots()

    def summary(self) -> dict[str, Any]:
        return {
            "validationMode": self.bundle.mode,
            "trustedRoots": list(self.bundle.names),
            "trustBundle": str(self.bundle.path),
            "rootWarnings": self.root_warnings,
        }

    async def update(self, mode: str, ca_file: str, from_config: bool, live_spec: LiveSpec) -> dict[str, Any]:
        """`gatewayctl trust update`: build the new bundle, prove it with a trial connection (with the live
        identity, `live_spec`), then use it; if the uplink does not connect with it within
        renewal.trial_timeout, the previous bundle comes back. Either way the answer says what happened."""
        up, state_dir = self.config.upstream, Path(self.config.gateway.state_dir)
        mode, ca_file = self._requested(mode, ca_file, from_config)
        catalog = truststore.catalog_from_env(AMAZON)
        candidate_path = state_dir / "trust" / "candidate.pem"
        spec = live_spec(candidate_path)
        if spec is None:
            raise TrustError(
                "no working identity to prove the new bundle with: the uplink must be able to connect"
            )
        candidate = await asyncio.to_thread(
            truststore.build, mode, catalog, Path(up.system_ca_bundle),
            Path(ca_file) if ca_file else None, state_dir, candidate_path.name,
        )  # fmt: skip
        old_trust, old_data = self.bundle, self.bundle.path.read_bytes()
        old_override = truststore.read_override(state_dir)

        async def install() -> None:
            new_override = None if from_config else (mode, ca_file)
            await asyncio.to_thread(self._install_bundle, candidate, new_override)

        async def rollback() -> None:
            atomic.write_file(old_trust.path, old_data, 0o644)
            truststore.write_override(state_dir, old_override)
            self.bundle = old_trust

        s = self.config.renewal
        try:
            refused = await switch_over(
                self.uplink, spec, bool(s.trial_client_id), s.trial_timeout.seconds, install, rollback
            )
        finally:
            candidate.path.unlink(missing_ok=True)
        if refused is not None:
            raise self._refusal(mode, refused)
        log.info(
            "trust updated to %s (%s)", mode, ", ".join(self.bundle.names),
            extra=logevents.extra(logevents.TRUST_UPDATED, mode=mode, roots=",".join(self.bundle.names)),
        )  # fmt: skip
        self.check_roots()
        return {
            "validationMode": self.bundle.mode,
            "trustedRoots": list(self.bundle.names),
            "fromConfig": from_config,
            "previousMode": old_trust.mode,
        }

    def _requested(self, mode: str, ca_file: str, from_config: bool) -> tuple[str, str]:
        """The validation mode and CA file asked for (or the config's), checked."""
        up = self.config.upstream
        if from_config:
            mode, ca_file = up.validation_mode, up.ca_file if up.validation_mode in FILE_MODES else ""
        if mode not in MODES:
            raise TrustError(f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")
        if mode in FILE_MODES and not ca_file:
            raise TrustError(f"'mode' {mode} needs 'caFile'")
        if mode not in FILE_MODES and ca_file:
            raise TrustError(f"'caFile' is used only with 'mode' custom or legacy, not {mode}")
        if ca_file and not Path(ca_file).is_absolute():
            raise TrustError("'caFile' must be an absolute path (the daemon reads it)")
        return mode, ca_file

    def _refusal(self, mode: str, refused: Refused) -> TrustError:
        """Logged (TRUST_UPDATE_FAILED), and the error the command answers with."""
        verb = "refused: the trial connection failed" if refused.stage == "trial" else "rolled back"
        log.warning(
            "trust update to %s %s: %s", mode, verb, refused.reason,
            extra=logevents.extra(logevents.TRUST_UPDATE_FAILED, mode=mode, reason=refused.reason),
        )  # fmt: skip
        if refused.stage == "trial":
            return TrustError(
                f"the {mode} bundle did not verify the endpoint ({refused.reason}); trust unchanged"
            )
        return TrustError(f"trust update to {mode} rolled back: {refused.reason}")

    def _install_bundle(self, candidate: truststore.TrustBundle, override: tuple[str, str] | None) -> None:
        state_dir = Path(self.config.gateway.state_dir)
        path = state_dir / "trust" / "bundle.pem"
        atomic.write_file(path, candidate.path.read_bytes(), 0o644)
        truststore.write_override(state_dir, override)
        self.bundle = truststore.TrustBundle(
            candidate.mode, path, candidate.certs, candidate.names, candidate.source
        )
