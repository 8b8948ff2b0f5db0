"""`gatewayd [run] --config PATH` runs the daemon; `gatewayd check-config --config PATH` validates.

Exit statuses (documented in docs/operations.md and gatewayd(8)):
  0   clean stop, or check-config found no problem
  1   check-config found problems; or the daemon failed at run time (systemd restarts it)
  78  the configuration, or the trust store it selects, is unusable at start (EX_CONFIG; the unit's
      RestartPreventExitStatus=): an operator must act, restarting cannot help
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from gatewayd import __version__
from gatewayd.core import logevents
from gatewayd.core.errors import ConfigError, GatewaydError, TrustError
from gatewayd.service.daemon import run_daemon
from gatewayd.service.logsetup import setup_logging
from gatewayd.stores.configfile import config_files, load

DEFAULT_CONFIG = Path("/etc/gatewayd/gatewayd.toml")
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 78

log = logging.getLogger("gatewayd")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"main config file; drop-ins are read from PATH.d/*.toml (default {DEFAULT_CONFIG})",
    )
    parser = argparse.ArgumentParser(prog="gatewayd", parents=[common], description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground (the default)")
    sub.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and exit 0 or 1",
        description="Validate the configuration (with its drop-ins) and exit 0 or 1, listing every problem.",
        epilog=POLICY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


POLICY_HELP = """\
[downstream.policy] keys (topic filters; ${iot:ClientId}, ${iot:Certificate.Subject.CommonName} and
${gateway:ThingName} are replaced per sensor):
  publish, deny_publish     a publish is allowed when a publish filter matches its topic and no
                            deny_publish filter does
  subscribe, deny_subscribe judged as AWS IoT's iot:Subscribe and iot:Receive: a subscription is granted
                            when a subscribe filter covers it and no deny_subscribe filter covers it; each
                            message delivered is withheld when a deny_subscribe filter matches its topic.
                            subscribe = ["#"], deny_subscribe = ["test/nosubscribe"]: "#" and "+/+" are
                            granted and never receive test/nosubscribe; "test/nosubscribe" is refused.
                            $share/<group>/<filter> is judged on <filter>.
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path: Path = getattr(args, "config", DEFAULT_CONFIG)
    if args.command == "check-config":
        return check_config(config_path)
    return run(config_path)


def check_config(path: Path) -> int:
    try:
        load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILURE
    files = config_files(path)
    print(f"{path}: OK ({len(files) - 1} drop-in{'s' if len(files) != 2 else ''})")
    return EXIT_OK


def run(path: Path) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        setup_logging()
        for problem in exc.problems:
            log.error("invalid configuration: %s", problem, extra=logevents.extra(logevents.CONFIG_INVALID))
        return EXIT_CONFIG
    target = setup_logging(config.logging.level)
    log.debug("logging to %s", target)
    try:
        return asyncio.run(run_daemon(path, config))
    except TrustError as exc:  # the operator must act (ca-certificates, ca_file): restarting cannot help
        log.error("%s", exc, extra=logevents.extra(logevents.CONFIG_INVALID))
        return EXIT_CONFIG
    except GatewaydError as exc:
        log.error("%s", exc, extra=logevents.extra(logevents.FATAL_ERROR))
        return EXIT_FAILURE
    except Exception:
        log.exception("unexpected error", extra=logevents.extra(logevents.FATAL_ERROR))
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
