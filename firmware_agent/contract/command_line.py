"""The command-line edge shared by ``footfall-agent`` and ``footfall-aggregator``.

A command's own errors end as one line on stderr (``PROG: error: ...``) and exit status 1;
no traceback. Logs go unbuffered to stderr through the program's named logger. Standard
library only: the aggregator imports it too.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["run_command"]


def run_command(
    prog: str, log: logging.Logger, errors: type[Exception], args: argparse.Namespace
) -> int:
    """Run ``args.func(args)`` with ``prog``'s logging; its ``errors`` become one line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
    log.handlers = [handler]
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        status: int = args.func(args)
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130
    return status
