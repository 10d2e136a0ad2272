"""People stage: the estimator's linked chains in, people-level figures per window out.

See docs/messages.md (counts v2) for the definitions this module implements.
"""

from __future__ import annotations

__all__ = ["PRESENCE_HOLD_S"]

PRESENCE_HOLD_S = 120
"""A visit is present for this long after each of its frames (seconds)."""
