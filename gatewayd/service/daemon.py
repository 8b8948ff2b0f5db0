"""The composition root: starts the components, talks to systemd, handles signals and reloads.

Lifecycle (sd_notify(3)):
- READY=1 only once every component has started; STATUS= on every state change a person cares about.
- WATCHDOG=1 every WATCHDOG_USEC/2, sent by a coroutine on the event loop itself, so a stalled loop stops the
  pings and systemd's watchdog fires.
- SIGHUP: RELOADING=1, re-read the config, apply the live keys, log each restart-only key, READY=1. An invalid
  config is refused and the running one kept.
- SIGTERM/SIGINT: STOPPING=1, close components cleanly, exit 0 within SHUTDOWN_BUDGET seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gatewayd import __version__
from gatewayd.adapters.heap import release_free_memory
from gatewayd.adapters.systemd import Notifier, watchdog_interval
from gatewayd.core import logevents
from gatewayd.core.commands import BY_NAME
from gatewayd.core.config import Config, diff, with_live_changes
from gatewayd.core.errors import ConfigError, ControlError
from gatewayd.core.timefmt import iso_utc
from gatewayd.service.clock import ClockChange, ClockWatch
from gatewayd.service.control import ControlServer
from gatewayd.service.downstream.registry_commands import run_command
from gatewayd.service.logsetup import apply_level
from gatewayd.service.root import Components, Hooks, build
from gatewayd.service.upstream.renewal import Renewer
from gatewayd.stores.configfile import load
from gatewayd.stores.statedir import ensure_state_dir

STATUS_REFRESH = 5.0  # seconds
BACKLOG_LOG_EVERY = 60.0  # seconds
HEAP_TRIM_EVERY = 30.0  # seconds between handing the C heap's free pages back (adapters/heap.py)

log = logging.getLogger("gatewayd.daemon")

SHUTDOWN_BUDGET = 8.0  # seconds; systemd's TimeoutStopSec must be larger (the unit uses 10 s or more)
HOLD_ENV = "GATEWAYD_DEBUG_RENEWAL_HOLD"  # with DEBUG_ENV: checkpoints where renewals pause (tests)
DEBUG_ENV = "GATEWAYD_DEBUG_COMMANDS"  # "1" enables debug-only control commands (tests, never in production)


FD_RESERVE = 128  # file descriptors besides sensor connections: state files, the uplink, journald, helpers


def file_descriptors(config: Config) -> int:
    """Raise the soft limit on open files to the hard one (systemd's LimitNOFILE=, or the shell's), and warn
    when even that cannot hold max_connections + max_pending_connections + FD_RESERVE: past it, accept()
    fails and a real sensor is locked out. Returns the soft limit in force."""
    d = config.downstream
    needed = d.max_connections + d.max_pending_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open files limited to %d, fewer than downstream.max_connections + max_pending_connections + "
            "%d = %d: raise LimitNOFILE= in a drop-in for the unit (`systemctl edit gatewayd`) or lower them",
            soft, FD_RESERVE, needed,
        )  # fmt: skip
    return int(soft)


class Daemon:
    def __init__(self, config_path: Path, config: Config, environ: Mapping[str, str] = os.environ) -> None:
        self.config_path = config_path
        self.config = config
        self.environ = environ
        self.notifier = Notifier(environ)
        self.state = "starting"
        self.state_since = time.time()
        self.started_monotonic = time.monotonic()
        self.last_reload: dict[str, Any] | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.parts: Components | None = None  # once build() has started them all
        self.clock = ClockWatch(config.time.synchronized)
        self.clock.listeners.append(self._clock_changed)
        self._last_status = ""

    # ------------------------------------------------------------------ status

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("state %s -> %s", self.state, state)
            self.state, self.state_since = state, time.time()

    def status_line(self) -> str:
        if self.state != "running" or self.parts is None:
            line = f"{self.state.capitalize()}; thing {self.config.gateway.thing_name}"
        else:
            line = self.parts.status.line() + self.parts.forwarder.status_words()
        if not self.clock.synchronized:
            line += "; clock not synchronized"
        if self.last_reload and not self.last_reload["applied"]:
            line += f"; last reload refused ({self.last_reload['problems']} problems)"
        return line

    def _clock_changed(self, change: ClockChange) -> None:
        if self.parts is not None:
            self.parts.upstream.clock_changed(change.synchronized)
            self.parts.downstream.clock_changed(change.jump, change.synchronized)
        self._status_changed()

    def _status_changed(self) -> None:
        line = self.status_line()
        if line != self._last_status and self.state == "running":
            self._last_status = line
            self.notifier.status(line)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "since": iso_utc(self.state_since),
            "thingName": self.config.gateway.thing_name,
            "endpoint": self.config.upstream.endpoint,
            "port": self.config.upstream.port,
            "configPath": str(self.config_path),
            "pid": os.getpid(),
            "version": __version__,
            "uptimeSeconds": round(time.monotonic() - self.started_monotonic, 3),
            "lastReload": self.last_reload,
            "uplink": None,
            "spool": None,
            "sensors": 0,
            "serialSensors": 0,
            "hardware": None,
            "sensorSessions": 0,
            "upstreamSubscriptions": {},
            "droppedForSensors": 0,
            "registry": None,
            "clock": self.clock.summary(),
        }
        if self.parts is not None:  # running: every component answers
            body.update(self._components_status(self.parts))
        return body

    @staticmethod
    def _components_status(p: Components) -> dict[str, Any]:
        return {
            "uplink": p.status.summary(),
            "spool": p.forwarder.summary(),
            "sensors": len(p.broker.clients),
            "serialSensors": len(p.serial.ports),
            "hardware": p.hardware.summary(),
            "sensorSessions": len(p.broker.sessions),
            "upstreamSubscriptions": p.broker.upstream_refs,
            "droppedForSensors": p.broker.dropped,
            "registry": p.registry.summary(),
        }

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        self.notifier.status("Starting")
        state_dir = Path(self.config.gateway.state_dir)
        ensure_state_dir(state_dir)
        self.clock.announce()
        file_descriptors(self.config)
        hooks = Hooks(self._status_changed, lambda: self.clock.synchronized, self._renewal_holds())
        try:
            async with contextlib.AsyncExitStack() as components:
                self.parts = parts = await build(self.config, components, hooks)
                await components.enter_async_context(
                    ControlServer(
                        Path(self.config.gateway.control_socket),
                        self._handlers(parts),
                        self.config.gateway.control_group,
                    )
                )
                self._set_state("running")
                # Logged before READY=1, so the journal shows it before systemd's "Started" line.
                log.info(
                    "gatewayd %s ready (thing %s)",
                    __version__,
                    self.config.gateway.thing_name,
                    extra=logevents.extra(logevents.STARTED, thing_name=self.config.gateway.thing_name),
                )
                self.notifier.ready(self.status_line())
                await self._serve_until_stopped()
                try:
                    async with asyncio.timeout(SHUTDOWN_BUDGET):
                        await components.aclose()
                except TimeoutError:
                    log.error("components did not close within %s s; exiting anyway", SHUTDOWN_BUDGET)
                    return 1
        finally:
            self.notifier.close()
        log.info("clean shutdown complete", extra=logevents.extra(logevents.STOPPED))
        return 0

    async def _serve_until_stopped(self) -> None:
        tasks = [
            asyncio.create_task(self._reload_loop(), name="reload"),
            asyncio.create_task(self._refresh_status(), name="status"),
            asyncio.create_task(self._release_memory(), name="heap-trim"),
            asyncio.create_task(self.clock.run(), name="clock"),
        ]
        interval = watchdog_interval(self.environ)
        if interval is not None:
            log.info("systemd watchdog enabled: pinging every %.3f s", interval)
            tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        try:
            await self._stop.wait()
            self._set_state("stopping")
            self.notifier.stopping("Stopping")
            log.info("stopping on signal", extra=logevents.extra(logevents.STOPPING))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _refresh_status(self) -> None:
        """STATUS= follows the spool and the throttling too (sent only when the line changes); while
        messages wait in the spool, journald gets their figures once a minute."""
        last_backlog_log = -BACKLOG_LOG_EVERY  # the first backlog is logged at once
        while True:
            await asyncio.sleep(STATUS_REFRESH)
            self._status_changed()
            now = time.monotonic()
            due = now - last_backlog_log >= BACKLOG_LOG_EVERY
            if due and self.parts is not None and self.parts.forwarder.log_backlog():
                last_backlog_log = now

    async def _release_memory(self) -> None:
        """After a burst (many sensors connecting, a flood of readings), what the C heap freed stays in the
        process until it is handed back; a trim costs a few milliseconds (docs/performance.md)."""
        while True:
            await asyncio.sleep(HEAP_TRIM_EVERY)
            release_free_memory()

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: if anything blocks the loop, the pings stop and systemd acts.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ reload

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> None:
        self.notifier.reloading()
        self.notifier.status("Reloading configuration")
        try:
            new = await asyncio.to_thread(load, self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(
                    "reload refused: %s",
                    problem,
                    extra=logevents.extra(logevents.CONFIG_RELOAD_REFUSED, config_key=problem.key),
                )
            self.last_reload = {"at": iso_utc(time.time()), "applied": False, "problems": len(exc.problems)}
            self.notifier.ready(self.status_line())
            return
        changes = diff(self.config, new)
        for change in changes:
            if not change.live:
                log.warning(
                    "%s changed (%r -> %r) but needs a restart; keeping %r until then",
                    change.key,
                    change.old,
                    change.new,
                    change.old,
                    extra=logevents.extra(logevents.CONFIG_RESTART_REQUIRED, config_key=change.key),
                )
        self.config = with_live_changes(self.config, new)
        apply_level(self.config.logging.level)
        if self.clock.source != self.config.time.synchronized:
            self.clock.set_source(self.config.time.synchronized)
        if self.parts is not None:
            self.parts.broker.reconfigure(self.config)
            self.parts.registry.configure(self.config)
            self.parts.admission.configure(self.config)
            self.parts.upstream.reconfigure(self.config)
            self.parts.uplink.kick()  # a reload also means "try to connect again now"
        applied = [c.key for c in changes if c.live]
        pending = [c.key for c in changes if not c.live]
        log.info(
            "configuration reloaded: applied %s; restart needed for %s",
            ", ".join(applied) or "nothing",
            ", ".join(pending) or "nothing",
            extra=logevents.extra(
                logevents.CONFIG_RELOADED, applied=",".join(applied), restart=",".join(pending)
            ),
        )
        self.last_reload = {
            "at": iso_utc(time.time()),
            "applied": True,
            "changed": applied,
            "restartNeeded": pending,
        }
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------------ control commands

    def _handlers(self, parts: Components) -> dict[str, Any]:
        handlers: dict[str, Any] = {
            "status": self._cmd_status,
            "identity": functools.partial(self._cmd_identity, parts),
            "list-connections": functools.partial(self._cmd_list_connections, parts),
            "disconnect": functools.partial(self._cmd_disconnect, parts),
            "trust": functools.partial(self._cmd_trust, parts),
        }
        for name in BY_NAME:
            handlers[name] = functools.partial(self._cmd_registry, parts, name)
        if self.environ.get(DEBUG_ENV) == "1":
            log.warning("debug control commands are enabled (%s=1); never do this in production", DEBUG_ENV)
            handlers["debug-stall-loop"] = self._cmd_stall
            handlers["debug-renewal-release"] = functools.partial(self._cmd_renewal_release, parts)
        return handlers

    async def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _cmd_list_connections(self, parts: Components, args: dict[str, Any]) -> dict[str, Any]:
        return {"connections": parts.broker.list_connections() + parts.serial.list_connections()}

    async def _cmd_disconnect(self, parts: Components, args: dict[str, Any]) -> dict[str, Any]:
        client_id = str(args.get("clientId", ""))
        if not parts.broker.disconnect(client_id):
            raise ControlError(f"no sensor connected with client id {client_id!r}")
        return {"disconnected": client_id}

    async def _cmd_registry(self, parts: Components, command: str, args: dict[str, Any]) -> Any:
        result = run_command(parts.registry, command, args)
        if BY_NAME[command].changes:
            parts.downstream.refresh_trust()
            parts.broker.enforce_admission()  # a certificate or CA no longer ACTIVE: its sensors go now
            parts.serial.enforce_admission()
        return result

    async def _cmd_trust(self, parts: Components, args: dict[str, Any]) -> Any:
        if args.get("action") != "update":
            raise ControlError("unknown trust action")
        return await parts.upstream.trust_update(
            str(args.get("mode") or ""), str(args.get("caFile") or ""), bool(args.get("fromConfig"))
        )

    async def _cmd_identity(self, parts: Components, args: dict[str, Any]) -> Any:
        return await parts.upstream.cmd_identity(str(args.get("action", "")), args)

    def _renewal_holds(self) -> frozenset[str]:
        """GATEWAYD_DEBUG_RENEWAL_HOLD=name,...: pause renewals at these checkpoints (tests only)."""
        names = frozenset(filter(None, self.environ.get(HOLD_ENV, "").split(",")))
        if not names:
            return names
        if self.environ.get(DEBUG_ENV) != "1":
            log.warning("%s is ignored without %s=1", HOLD_ENV, DEBUG_ENV)
            return frozenset()
        unknown = names - set(Renewer.CHECKPOINTS)
        if unknown:
            log.warning("%s: ignoring unknown checkpoints %s", HOLD_ENV, ", ".join(sorted(unknown)))
            names -= unknown
        log.warning("debug: renewals will pause at %s", ", ".join(sorted(names)))
        return names

    async def _cmd_renewal_release(self, parts: Components, args: dict[str, Any]) -> dict[str, Any]:
        held = parts.renewer.held
        parts.renewer.release()
        return {"released": held}

    async def _cmd_stall(self, args: dict[str, Any]) -> dict[str, Any]:
        seconds = args.get("seconds")
        if not isinstance(seconds, int | float) or not 0 < seconds <= 600:
            raise ControlError("seconds must be a number in (0, 600]")
        log.warning("debug: blocking the event loop for %s s", seconds)
        time.sleep(seconds)  # deliberately blocks the loop: this is what the command is for
        return {"stalled": seconds}


async def run_daemon(config_path: Path, config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    return await Daemon(config_path, config).run()
