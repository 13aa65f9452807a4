"""Shared entry-point behaviour: logging, offline defaults, one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from cdsam.errors import ConfigError, UserError


def debug_enabled(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("CDSAM_DEBUG", "") not in ("", "0")


def setup_logging(name: str) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("cdsam").setLevel(logging.INFO)


def offline_defaults() -> None:
    """Never wait on a model hub unless the user asked for hub weights.

    Without this, a hub lookup on a machine with no network hangs ~47 s before failing.
    Users who want hub downloads set HF_HUB_OFFLINE=0 explicitly.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(main: Callable[[], int | None], name: str) -> None:
    """Call ``main``; user errors become one line per problem on stderr and exit code 2."""
    setup_logging(name)
    offline_defaults()
    try:
        code = main()
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        if debug_enabled():
            raise
        sys.exit(2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if debug_enabled():
            raise
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
