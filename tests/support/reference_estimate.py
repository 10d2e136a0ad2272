"""A plain-Python twin of the numba estimator (firmware_agent/stages/estimate.py), written from its
module documentation with dicts and lists: the kernel must give exactly the same windows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, tzinfo

from firmware_agent.stages.batch import KIND_PROBE, RSSI_MISSING
from firmware_agent.stages.config import AUTO, EstimateSettings
from firmware_agent.stages.estimate import (
    AUTO_FALLBACK_DBM,
    AUTO_MIN_CHAINS,
    AUTO_RANGE_DBM,
    AUTO_STEP_S,
    RING,
    WindowEstimate,
)

NS = 1_000_000_000

Row = tuple[int, int, int, int, int, int, int]  # kind, ts_ns, device, randomised, rssi, fp, seq


@dataclass
class _Chain:
    first: int
    last: int
    rssi: int
    best: int
    windows: dict[int, int] = field(default_factory=dict)  # window index -> best signal
    heard: int = 0  # windows heard in, counted when a newer one starts
    newest_window: int = -1
    joined: int = 0  # when its newest address joined it (0: none since a split)
    newest: int = 0  # that address


@dataclass
class _Fingerprint:
    new: int = 0
    continued: int = 0
    expected: int = 0  # chance matches x 4096
    recent: list[int] = field(default_factory=list)  # device ids, newest last (RING at most)


def _better(a: int, b: int) -> int:
    """The stronger of two signals, an unknown one giving way to a known one."""
    if a == RSSI_MISSING:
        return b
    if b == RSSI_MISSING:
        return a
    return max(a, b)


def otsu_reference(values: list[int]) -> int | None:
    """Otsu's threshold over integer values by brute force: the first value of the upper class
    that maximises the between-class variance, or the middle of a run of cuts that all do
    (empty values between the classes); None if all values are equal."""
    variances: dict[int, float] = {}
    for cut in range(min(values) + 1, max(values) + 1):
        low = [v for v in values if v < cut]
        high = [v for v in values if v >= cut]
        mean_low, mean_high = sum(low) / len(low), sum(high) / len(high)
        variances[cut] = len(low) * len(high) * (mean_low - mean_high) ** 2 / len(values) ** 2
    if not variances:
        return None
    top = max(variances.values())
    first = min(c for c, v in variances.items() if v >= top * (1 - 1e-12))
    last = first
    while last + 1 in variances and variances[last + 1] >= top * (1 - 1e-12):
        last += 1
    return first + (last - first) // 2


def reference_estimates(
    rows: Iterable[Row],
    s: EstimateSettings,
    zone: tzinfo = UTC,
    thresholds: list[int] | None = None,
) -> list[WindowEstimate]:
    """Every window the rows close, then the rest (as Estimator.add + close_all, the
    estimator in ``zone``); ``thresholds`` (if given) gets the threshold in force at each
    probe row."""
    w, lateness = s.window_s * NS, s.lateness_s * NS
    dwell = s.min_dwell_s * NS
    addresses: dict[int, list[int]] = {}  # device -> [chain, last, seq]
    chains: list[_Chain] = []
    fingerprints: dict[int, _Fingerprint] = {}
    out: list[WindowEstimate] = []
    oldest: int | None = None
    newest = 0
    opens = 0  # the site opens (static_closed_h) on the day of the first row
    step = AUTO_STEP_S * NS
    next_step = 0  # the next instant at which the threshold is learnt
    thr = s.rssi_threshold_dbm if s.rssi_threshold_dbm != AUTO else AUTO_FALLBACK_DBM

    def threshold() -> int:
        if s.rssi_threshold_dbm != AUTO:
            return s.rssi_threshold_dbm
        lingering = [c.best for c in chains if c.last - c.first >= dwell and c.best != RSSI_MISSING]
        if len(lingering) < AUTO_MIN_CHAINS:
            return AUTO_FALLBACK_DBM
        split = otsu_reference([min(max(v, -120), 0) for v in lingering])
        split = -120 if split is None else split
        return min(max(split, AUTO_RANGE_DBM[0]), AUTO_RANGE_DBM[1])

    def close(start: int) -> None:
        widx, end = start // w, start + w
        people = static = 0
        for c in chains:
            if widx not in c.windows:
                continue
            best = c.windows[widx]
            if best != RSSI_MISSING and best < thr:
                continue
            if s.static_min_s and c.first < opens and end - c.first >= s.static_min_s * NS:
                since = (end - c.first // w * w) // w
                if c.heard * 100 >= s.static_share_pct * since:
                    static += 1
                    continue
            if c.last - c.first >= dwell:
                people += 1
        out.append(WindowEstimate(start // NS, people, static, thr))

    def advance(due: int) -> None:
        """Learn at every step and close every window up to ``due``, in time order."""
        nonlocal oldest, next_step, thr
        assert oldest is not None
        while True:
            if next_step <= min(due, oldest + w):
                thr = threshold()
                next_step += step
            elif oldest + w <= due:
                close(oldest)
                oldest += w
            else:
                return

    def link(t: int, dev: int, fp: int, seq: int, rssi: int) -> int | None:
        f = fingerprints.setdefault(fp, _Fingerprint())
        recent, heard, best_delta, chain = 0, False, 4096, None
        for other in reversed(f.recent):
            c, last, other_seq = addresses[other]
            heard |= abs(t - last) <= max(s.link_gap_s, s.cadence_gap_s) * NS
            if abs(t - last) <= s.link_gap_s * NS:
                recent += 1
                delta = (seq - other_seq) % 4096
                if 1 <= delta <= s.seq_max_delta and delta < best_delta:
                    best_delta, chain = delta, c
        if heard:
            f.new += 1
            f.expected += min(4096, recent * s.seq_max_delta)
            f.continued += chain is not None
        resets = (
            f.new >= s.reset_min
            and 100 * (f.continued * 4096 - f.expected) < s.reset_share_pct * f.new * 4096
        )
        if resets:  # a counter that matched did so by chance
            chain = None
            candidates = []  # (first seen, newest first) of chains in cadence and in signal
            for order, other in enumerate(reversed(f.recent)):
                c = addresses[other][0]
                if abs(t - chains[c].last) > s.cadence_gap_s * NS:
                    continue
                known = RSSI_MISSING not in (rssi, chains[c].rssi)
                if known and abs(rssi - chains[c].rssi) > s.rssi_link_db:
                    continue
                candidates.append((chains[c].first, order, c))
            if candidates:
                chain = min(candidates)[2]
        if len(f.recent) == RING:  # the address heard longest ago (the oldest on a tie) leaves
            f.recent.remove(min(f.recent, key=lambda other: addresses[other][1]))
        f.recent.append(dev)
        return chain

    for kind, t, device, randomised, rssi, fp, seq in rows:
        if oldest is None:
            oldest, newest = t // w * w, t
            next_step = t // step * step + step
            day = datetime.fromtimestamp(t / NS, zone).date()
            opens = int(datetime.combine(day, time(s.static_closed_h % 24), zone).timestamp())
            opens = (opens + 86400 * (s.static_closed_h // 24)) * NS
        newest = max(newest, t)
        advance(newest - lateness)
        if kind != KIND_PROBE:
            continue
        if thresholds is not None:
            thresholds.append(thr)
        widx = max(t // w * w, oldest) // w
        dev = device or 1
        if dev not in addresses or t - addresses[dev][1] > s.visit_gap_s * NS:
            chain = None
            if s.link and (randomised or s.assume_randomised) and fp:
                chain = link(t, dev, fp, seq, rssi)
            if chain is None:
                chains.append(_Chain(t, t, rssi, rssi))
                chain = len(chains) - 1
            chains[chain].joined, chains[chain].newest = t, dev
            addresses[dev] = [chain, t, seq]
        elif addresses[dev][1] < chains[addresses[dev][0]].joined < t:
            # a phone never goes back to an address it has left: its newest one is another's
            old = chains[addresses[dev][0]]
            chains.append(_Chain(old.joined, old.joined, old.rssi, old.rssi))
            addresses[old.newest][0] = len(chains) - 1
            old.joined = old.newest = 0
        a = addresses[dev]
        a[1], a[2] = max(a[1], t), seq
        c = chains[a[0]]
        c.first, c.last = min(c.first, t), max(c.last, t)
        if rssi != RSSI_MISSING:
            c.rssi = rssi if c.rssi == RSSI_MISSING else (3 * c.rssi + rssi) // 4
            c.best = _better(c.best, rssi)
        c.windows[widx] = _better(c.windows[widx], rssi) if widx in c.windows else rssi
        if widx > c.newest_window:
            c.newest_window, c.heard = widx, c.heard + 1
    if oldest is not None:
        advance(newest // w * w + w)
    return out
