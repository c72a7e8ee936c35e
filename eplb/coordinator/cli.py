"""``eplb-sidecar``: the per-node daemon's command line.

Settings come from defaults < a TOML file (``--config`` or ``$EPLB_CONFIG``) < ``EPLB_*``
environment variables < flags; :mod:`eplb.coordinator.options` lists them all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from eplb.config import (ENV_PREFIX, ConfigError, Setting, add_options, config_path_from,
                         env_settings, flags_given, render_toml, resolve)
from eplb.coordinator.options import BY_NAME, OPTIONS, fill_computed_defaults, sidecar_config
from eplb.coordinator.sidecar import Sidecar, SidecarConfig
from eplb.logs import setup_logging
from eplb.paths import RunDirError

log = logging.getLogger("eplb.sidecar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eplb-sidecar",
        description="Per-node rebalance sidecar for expert-parallel MoE inference. Run one per node; "
                    "node 0 is the leader that plans rebalances and drives the step agreement. "
                    "Every option can also be set in a TOML file (key = option name, e.g. "
                    "min-margin = 4) or in an EPLB_* environment variable (EPLB_MIN_MARGIN=4); "
                    "flags win over the environment, which wins over the file.",
        epilog="Endpoints: http://HOST:PORT/metrics (Prometheus), /healthz (event loop "
               "responsive), /readyz (local: workers joined; ?leader=1 adds the leader's "
               "reachability). SIGTERM: not ready, "
               "abort an uncommitted epoch, close, exit 0 within --grace-period. Under systemd "
               "(Type=notify) it sends READY=1, STOPPING=1 and WATCHDOG=1. See deploy/README.md.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML file of settings [env {ENV_PREFIX}CONFIG]")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (as TOML, each value with its source) "
                        "and exit")
    add_options(p, OPTIONS)
    return p


def load_settings(argv: list[str] | None, environ: Mapping[str, str]
                  ) -> tuple[argparse.Namespace, dict[str, Setting], list[str]]:
    """Parse flags and merge every layer. Returns (flags, settings, unknown EPLB_* variables).

    Raises:
        ConfigError: a bad or missing value.
    """
    args = build_parser().parse_args(argv)
    path, _ = config_path_from(args.config, environ)
    settings = resolve(BY_NAME, flags_given(args, BY_NAME), environ, path)
    fill_computed_defaults(settings)
    _, unknown = env_settings(environ, BY_NAME, ignore=(f"{ENV_PREFIX}CONFIG",))
    return args, settings, unknown


def config_from_argv(argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """The daemon's config from a command line and environment (raises :class:`ConfigError`)."""
    _, settings, _ = load_settings(argv, os.environ if environ is None else environ)
    return sidecar_config(settings)


async def _serve(sidecar: Sidecar) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    grace = sidecar.config.grace_s

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.info("%s again: already stopping", signal.Signals(signum).name)
            return
        log.info("%s: shutting down (grace period %gs)", signal.Signals(signum).name, grace)
        stop.set()
        # The orderly stop runs on the loop; this timer ends the process if the loop cannot.
        timer = threading.Timer(grace, _overdue, args=(grace,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await sidecar.run(stop)


def _overdue(grace: float) -> None:
    log.error("shutdown took longer than --grace-period %gs; exiting now", grace)
    logging.shutdown()
    os._exit(1)


def run_event_loop(coro) -> None:
    """Run on uvloop; fall back to asyncio's own loop (and say so) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on the default asyncio event loop")
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    try:
        args, settings, unknown = load_settings(argv, os.environ)
        config = sidecar_config(settings)
    except ConfigError as exc:
        print(f"eplb-sidecar: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_toml(BY_NAME, settings))
        for var in unknown:
            print(f"eplb-sidecar: warning: {var} names no option (ignored)", file=sys.stderr)
        return 0
    setup_logging(settings["log-format"].value, settings["log-level"].value,
                  node=config.node_rank)
    for var in unknown:
        log.warning("ignoring environment variable %s: no such option (see eplb-sidecar --help)",
                    var)
    sidecar = Sidecar(config)
    try:
        run_event_loop(_serve(sidecar))
    except RunDirError as exc:
        print(f"eplb-sidecar: {exc}", file=sys.stderr)
        return 2
    if sidecar.failed:
        return 1
    log.info("node %d: exited cleanly", config.node_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
