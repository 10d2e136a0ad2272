"""The installer's table of checks, shared by ``footfall-agent doctor`` and
``footfall-aggregator agents check``: one line per check, a fix under each one that is not ok,
and an exit status for scripts (0 unless a check failed; a warning does not fail).

Standard library only: the aggregator imports it too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = ["FAIL", "OK", "SKIP", "WARN", "Finding", "exit_status", "print_table"]

OK, WARN, FAIL, SKIP = "ok", "WARN", "FAIL", "skip"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str  # OK, WARN, FAIL or SKIP
    detail: str
    fix: str = ""


def exit_status(findings: Sequence[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


def print_table(findings: Sequence[Finding], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    width = max(len(f.check) for f in findings)
    out.write(f"{'check':<{width}}  {'':<4}  result\n")
    for f in findings:
        out.write(f"{f.check:<{width}}  {f.status:<4}  {f.detail}\n")
        if f.fix:
            out.write(f"{'':<{width}}        fix: {f.fix}\n")
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    if failed:
        out.write(f"{failed} of {len(findings)} checks failed\n")
    elif warned:
        out.write(f"no check failed, {warned} warned\n")
    else:
        out.write("all checks passed\n")
    out.flush()
