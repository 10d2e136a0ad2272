"""A plain-Python twin of the numba people stage (firmware_agent/stages/people.py), written offline
from the definitions in docs/messages.md (counts v2): visits cut at silences longer than the
visit gap, arrivals at the first frame in the venue (at or above its threshold) the minimum
dwell after the first such frame, presence sampled on fixed instants, ends at the
last frame + the gap, dwell with the visit's own probing interval added. The kernel, which works
online with a ring of slots, must give exactly the same windows for rows in time order."""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable

from firmware_agent.stages.batch import DWELL_BANDS, DWELL_EDGES_MIN, RSSI_MISSING, WindowPeople
from firmware_agent.stages.people import BURST_S, SAMPLE_S, PeopleSettings

NS = 1_000_000_000
Row = tuple[int, int, int, int]  # ts_ns, chain, rssi, the signal threshold in force


def _visits(frames: list[tuple[int, int, int]], gap: int) -> Iterable[list[tuple[int, int, int]]]:
    visit = [frames[0]]
    for frame in frames[1:]:
        if frame[0] - visit[-1][0] > gap:
            yield visit
            visit = []
        visit.append(frame)
    yield visit


def reference_people(
    rows: Iterable[Row], settings: PeopleSettings, until_ns: int
) -> list[WindowPeople]:
    """Every window from the first row's to ``until_ns`` (the input's end: visits still open
    end in the last window); each frame judged against its own row's threshold."""
    w, gap = settings.window_s * NS, settings.visit_gap_s * NS
    hold, dwell, s = settings.hold_s * NS, settings.min_dwell_s * NS, SAMPLE_S * NS
    static = settings.static_min_s * NS
    by_chain: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    first = None
    for t, chain, rssi, threshold in rows:
        by_chain[chain].append((t, rssi, threshold))
        first = t if first is None else first
    if first is None:
        return []
    starts = range(first // w * w, until_ns, w)
    events: dict[int, dict[str, int]] = {start: defaultdict(int) for start in starts}
    present: list[tuple[list[int], int]] = []  # per arrived visit: frames from its arrival on,
    # and when it became a static device (presence ends there)
    for frames in by_chain.values():
        for visit in _visits(frames, gap):
            near = [rssi == RSSI_MISSING or rssi >= threshold for _, rssi, threshold in visit]
            since = next((t for (t, _, _), n in zip(visit, near, strict=True) if n), None)
            arrived = next(
                (j for j, ((t, _, _), n) in enumerate(zip(visit, near, strict=True))
                 if n and since is not None and t - since >= dwell),
                None,
            )  # fmt: skip
            last = visit[-1][0]
            end = min(last + gap, until_ns - 1)
            if arrived is None and since is not None and until_ns - since < dwell:
                arrived = len(visit)  # cut short by the input's end: it arrives there
                events[end // w * w]["arrivals"] += 1
            elif arrived is None:
                events[end // w * w]["passersby"] += 1
                continue
            else:
                events[visit[arrived][0] // w * w]["arrivals"] += 1
            times = [t for t, _, _ in visit[arrived:]]
            became = next((t for t in times if static and t - visit[0][0] >= static), None)
            if became is not None:  # a static device: out of occupancy, its end counts nothing
                present.append(([t for t in times if t < became], became))
                continue
            events[end // w * w]["visits_ended"] += 1
            span = last - visit[0][0]
            gaps = sum(b[0] - a[0] > BURST_S * NS for a, b in itertools.pairwise(visit))
            minutes = (span + (span // gaps if gaps else hold)) // (60 * NS)
            band = sum(minutes >= edge for edge in DWELL_EDGES_MIN)
            events[end // w * w][DWELL_BANDS[band]] += 1
            present.append((times, until_ns))
    out = []
    for start in starts:
        samples = [
            sum(1 for times, stop in present if u < stop and _held(times, u, hold))
            for u in range(start, start + w, s)
        ]
        e = events[start]
        out.append(
            WindowPeople(
                window_start=start // NS,
                arrivals=e["arrivals"],
                passersby=e["passersby"],
                visits_ended=e["visits_ended"],
                dwell_minutes={band: e[band] for band in DWELL_BANDS},
                occupancy_mean=round(sum(samples) / len(samples), 2),
                occupancy_peak=max(samples),
            )
        )
    return out


def _held(times: list[int], u: int, hold: int) -> bool:
    """Whether a frame of ``times`` (sorted) is at most ``hold`` before ``u``: f <= u < f + hold."""
    i = bisect.bisect_right(times, u)
    return i > 0 and u < times[i - 1] + hold
