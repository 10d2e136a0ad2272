"""``footfall-agent inspect``: the facts tshark gives about a capture, by our own path.

The same capture -> parse -> anonymize stages as the agent, with a throwaway key: distinct
transmitters are counted from keyed device ids, so nothing here ever prints an address.
The keys of the result match those of ``../shared/tools/tshark_stats.sh`` so that the
tests can hold the parser to tshark as an independent oracle.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import CaptureError
from firmware_agent.stages.anonymize import EpochKey, anonymize
from firmware_agent.stages.batch import (
    KIND_FCS_BAD,
    KIND_MALFORMED,
    KIND_NO_SA,
    KIND_PROBE,
    NS,
    RSSI_MISSING,
    SSID_DIRECTED,
    SSID_WILDCARD,
)
from firmware_agent.stages.capture import SUPPORTED_LINK_TYPES, CaptureReader
from firmware_agent.stages.parse import parse_batch

__all__ = ["inspect_capture"]


def inspect_capture(
    source: str | os.PathLike[str], progress: Callable[[CaptureReader], None] | None = None
) -> dict[str, object]:
    """One JSON-ready object of facts about a capture (``read_error`` instead of raising)."""
    facts: dict[str, object] = {
        "file": os.fspath(source),
        "file_type": "",
        "link_type": None,
        "frames": 0,
        "probe_requests": 0,
        "probe_malformed": 0,
        "probe_fcs_bad": 0,
        "unique_sa": 0,
        "unique_sa_local": 0,
        "wildcard_probes": 0,
        "directed_probes": 0,
        "dbm_min": None,
        "dbm_max": None,
        "probe_first_ts": None,
        "probe_last_ts": None,
        "read_error": False,
        "error": "",
    }
    key = EpochKey()
    ids: list[NDArray[np.uint64]] = []
    local_ids: list[NDArray[np.uint64]] = []
    counts = dict.fromkeys(
        (
            "frames",
            "probe_requests",
            "probe_malformed",
            "probe_fcs_bad",
            "wildcard_probes",
            "directed_probes",
        ),
        0,
    )
    dbm: list[int] = []
    first_ts: int | None = None
    last_ts: int | None = None
    try:
        with CaptureReader(source) as reader:
            facts["file_type"] = reader.file_type
            for batch in reader:
                probes = parse_batch(batch)
                batch.data.fill(0)
                ssid = probes.ssid  # the SSID kind is for this report; the agent drops it
                rows = anonymize(probes, key)
                counts["frames"] += rows.frames
                probe = (rows.kind & KIND_PROBE) != 0
                counts["probe_requests"] += int(probe.sum())
                counts["probe_malformed"] += int(
                    (probe & ((rows.kind & KIND_MALFORMED) != 0)).sum()
                )
                counts["probe_fcs_bad"] += int((probe & ((rows.kind & KIND_FCS_BAD) != 0)).sum())
                counts["wildcard_probes"] += int((probe & (ssid == SSID_WILDCARD)).sum())
                counts["directed_probes"] += int((probe & (ssid == SSID_DIRECTED)).sum())
                with_sa = probe & ((rows.kind & KIND_NO_SA) == 0)
                ids.append(rows.device[with_sa])
                local_ids.append(rows.device[with_sa & (rows.randomised == 1)])
                signal = rows.rssi[probe & (rows.rssi != RSSI_MISSING)]
                if signal.size:
                    dbm += [int(signal.min()), int(signal.max())]
                ts = rows.ts_ns[probe]
                if ts.size:
                    lo, hi = int(ts.min()), int(ts.max())
                    first_ts = lo if first_ts is None else min(first_ts, lo)
                    last_ts = hi if last_ts is None else max(last_ts, hi)
                if progress is not None:
                    progress(reader)
            facts["read_error"] = reader.truncated
            if reader.truncated:
                facts["error"] = f"cut mid-record after {reader.records_read} records"
            seen = sorted(reader.link_types_seen)
            facts["link_type"] = ",".join(
                f"{lt} ({SUPPORTED_LINK_TYPES.get(lt, '?')})" for lt in seen
            )
    except CaptureError as exc:
        facts["read_error"] = True
        facts["error"] = str(exc)
    finally:
        key.wipe()
    facts.update(counts)
    facts["unique_sa"] = _distinct(ids)
    facts["unique_sa_local"] = _distinct(local_ids)
    if dbm:
        facts["dbm_min"], facts["dbm_max"] = min(dbm), max(dbm)
    if first_ts is not None and last_ts is not None:
        facts["probe_first_ts"] = round(first_ts / NS, 6)
        facts["probe_last_ts"] = round(last_ts / NS, 6)
    return facts


def _distinct(parts: list[NDArray[np.uint64]]) -> int:
    if not parts:
        return 0
    return int(np.unique(np.concatenate(parts)).size)
