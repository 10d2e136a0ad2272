"""``footfall-aggregator``: the aggregator's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aggregator import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="footfall-aggregator",
        description="footfall aggregator: verified ingest of agents' counts, store, dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"footfall-aggregator {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("footfall-aggregator: no command yet; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
