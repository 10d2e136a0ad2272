"""The one catalogue of the counts messages' fields, and of the privacy rules on them.

Everything that has to agree on what a counts message holds reads it from here: the agent's
privacy stage releases by it (:mod:`firmware_agent.stages.privacy`), the reviewer's audit
checks by it (:mod:`firmware_agent.tools.audit`), the aggregator's roll-ups, store and API name
their columns from it (:mod:`aggregator.rollup`), the JSON Schemas are tested against it
(``tests/agent/test_fields.py``) and ``docs/messages.md``'s field lists are generated from it
(``python -m tests.support.fields_doc``). Before this module the lists lived in eight places and
drifted: the audit's hand copy of what strict mode omits let a ``strict`` agent publish
``static_excluded`` (issue 19).

A figure is named as in the payload, a dwell band as ``dwell_minutes.<band>`` (a "flat" name);
:func:`column` is its name outside JSON (database columns, API rows, CSV headers).

Site and agent ids (:data:`ID_PATTERN`) are here too: topics, payloads, schemas, the audit, the
API's paths and the settings all hold ids to this one pattern.

Standard library only: the aggregator and the audit import it without the agent's stages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CATALOGUE",
    "COUNTS",
    "COUNTS_V1",
    "COUNTS_V2",
    "DIAGNOSTICS",
    "DP_WITHHELD",
    "DWELL",
    "DWELL_BANDS",
    "DWELL_EDGES_MIN",
    "DWELL_FIELDS",
    "EVICTIONS",
    "FRAME_COUNTS",
    "HEADER",
    "ID_PATTERN",
    "IMPLICIT",
    "LEVELS",
    "NEVER_PUBLISHED",
    "PEOPLE_COUNTS",
    "PEOPLE_FIGURES",
    "RELATIONS",
    "STANDARD_PUBLISHES",
    "STRICT_OMITS",
    "STRICT_PUBLISHES",
    "WITH_PEAK",
    "CountsFields",
    "column",
]

ID_PATTERN = "[a-z0-9][a-z0-9_-]{0,62}"
"""Site and agent ids: lower-case letters, digits, ``_`` and ``-``, at most 63 characters, so
that an id is a topic level, a file name and a URL path segment as it is."""

HEADER = ("kind", "v", "site", "agent", "seq", "epoch", "window_start", "window_s")
"""Every counts message's header, in every version."""
FRAME_COUNTS = ("probe_requests", "malformed", "late_frames")
"""Frames, not devices: never suppressed; under noise, bounded and noised."""
DWELL = "dwell_minutes"
DWELL_BANDS = ("lt5", "5-15", "15-30", "30-60", "ge60")
DWELL_EDGES_MIN = (5, 15, 30, 60)
"""The bands' edges in minutes: a visit of ``m`` minutes is in band ``sum(m >= edge)``."""
DWELL_FIELDS = tuple(f"{DWELL}.{band}" for band in DWELL_BANDS)

PEOPLE_COUNTS = ("arrivals", "passersby", "visits_ended", *DWELL_FIELDS)
"""Counts v2's additive people figures (sums over time), flat."""
LEVELS = ("occupancy_mean", "occupancy_peak")
"""Counts v2's people present: a time-weighted mean and a maximum, never summed."""
PEOPLE_FIGURES = ("arrivals", "passersby", "visits_ended", DWELL, *LEVELS)
"""Counts v2's people-level figures as payload fields (null when suppressed or ``no_data``)."""
DIAGNOSTICS = ("devices", "devices_randomised", "static_excluded")
"""Counts v2's device-level figures: capture health, not people."""
STANDARD_PUBLISHES = (*PEOPLE_FIGURES, "calibrated", *DIAGNOSTICS)
"""The optional counts v2 figures (``meta.privacy.published`` has one flag each); the
standard mode publishes them all."""
STRICT_PUBLISHES = ("devices", "devices_randomised")
"""Strict: no chain outlives a window (the key, the device table and the fingerprints go
every window), so there are no people figures: the device diagnostics only."""
STRICT_OMITS = tuple(name for name in STANDARD_PUBLISHES if name not in STRICT_PUBLISHES)
"""What a strict agent never publishes (``static_excluded`` among them: the estimator's
static devices are devices followed for hours)."""
DP_WITHHELD = tuple(name for name in STANDARD_PUBLISHES if name not in STRICT_PUBLISHES)
"""Withheld under differential privacy: one device can split into several chains (its random
addresses not linked), and the signal threshold can be learnt, so one device id can move a
people figure, or the static devices, by more than any stated sensitivity
(``docs/PRIVACY.md``). The same fields as :data:`STRICT_OMITS`, for another reason."""
NEVER_PUBLISHED = ("devices_epoch", "people_est", "people", "probe_requests_clipped")
"""Never published (membership oracles, issue 17; the noise's bounded frame count)."""
IMPLICIT = ("devices_global",)
"""Never published but follows from others: devices with a global address."""
COUNTS = (*PEOPLE_COUNTS, "occupancy_peak", *DIAGNOSTICS)
"""Counts v2's counts of people, visits and devices: what suppression (k) and noise apply to."""
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("devices", ("devices_randomised", *IMPLICIT)),
    ("visits_ended", DWELL_FIELDS),
)
"""Counts v2's additive relations, total = sum of parts: what complementary suppression
keeps a reader from subtracting back to a small count."""
WITH_PEAK = ("occupancy_mean",)
"""Suppressed with ``occupancy_peak``: the mean is at most the peak, so as small."""


@dataclass(frozen=True, slots=True)
class CountsFields:
    """One counts version's fields and privacy rules (flat names)."""

    v: int
    required: tuple[str, ...]  # in every message (with the header)
    optional: tuple[str, ...]  # absent when the privacy mode (or the agent) does not publish it
    counts: tuple[str, ...]  # counts of people, visits or devices: k applies
    relations: tuple[tuple[str, tuple[str, ...]], ...]
    strict_omits: tuple[str, ...]
    dp_withheld: tuple[str, ...]
    never_published: tuple[str, ...] = NEVER_PUBLISHED

    @property
    def fields(self) -> tuple[str, ...]:
        """Every top-level field a message of this version may hold (its schema's
        properties)."""
        return (*HEADER, *self.required, *self.optional)


COUNTS_V2 = CountsFields(
    v=2,
    required=("no_data", *FRAME_COUNTS, *STRICT_PUBLISHES),
    optional=tuple(name for name in STANDARD_PUBLISHES if name not in STRICT_PUBLISHES),
    counts=COUNTS,
    relations=RELATIONS,
    strict_omits=STRICT_OMITS,
    dp_withheld=DP_WITHHELD,
)
COUNTS_V1 = CountsFields(
    v=1,
    required=(*FRAME_COUNTS, "devices", "devices_randomised", "visitors", "passersby"),
    optional=("visits_ended", DWELL, "devices_epoch", "people_est", "static_excluded", "people"),
    # The order is the aggregator's column order (a bit each in its ``suppressed``).
    counts=(
        "devices",
        "devices_randomised",
        "visitors",
        "passersby",
        "visits_ended",
        *DWELL_FIELDS,
        "devices_epoch",
        "people_est",
        "people",
        "static_excluded",
    ),
    relations=(("devices", ("visitors", "passersby")), *RELATIONS),
    strict_omits=("visits_ended", DWELL, "static_excluded"),
    dp_withheld=("static_excluded",),
)
"""Counts v1: no agent of this release publishes it; readers keep accepting it, frozen."""
CATALOGUE = {fields.v: fields for fields in (COUNTS_V1, COUNTS_V2)}

EVICTIONS = ("count_evictions", "estimate_evictions")
"""Status v2's figures beyond v1's: eviction rounds since the agent started, of the count
stage's device table and of the estimate stage's tables (ceiling events, not rows: one round
evicts many rows, and the rounds move only when a table is full, ``docs/PRIVACY.md``)."""


def column(name: str) -> str:
    """A figure's name outside JSON: ``dwell_minutes.5-15`` is ``dwell_5_15``."""
    return name.replace(f"{DWELL}.", "dwell_").replace("-", "_")
