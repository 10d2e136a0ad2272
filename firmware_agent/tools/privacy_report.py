"""``footfall-agent privacy-report``: the effective privacy settings in plain language.

Written for a shop owner, a works council or a data-protection officer: what the agent
hears, what it keeps in memory and for how long, what it writes to disk, what leaves the
device, and which rule each mode answers. Every figure comes from the loaded settings.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from firmware_agent.service.config import AgentConfig
from firmware_agent.stages.batch import WindowCounts
from firmware_agent.stages.privacy import COLLISION_FLOOR, linear_count, shared_share

__all__ = ["privacy_report"]


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return f"{hours} hour" + ("s" if hours != 1 else "")
    minutes = seconds // 60
    return f"{minutes} minute" + ("s" if minutes != 1 else "")


def privacy_report(
    config: AgentConfig, measured: tuple[str, Sequence[WindowCounts]] | None = None
) -> str:
    """The report's text for ``config``; with ``measured`` (a capture's name and the windows
    the agent counts from it), strict mode's collision rate as achieved there."""
    p = config.privacy
    window = _duration(config.count.window_s)
    identity = config.identity
    if config.epoch.length_s is None:
        zone = str(config.values["epoch.timezone"]) or "the system's time zone"
        key_life = f"at local midnight ({zone}), and at least every 24 hours"
    else:
        key_life = f"every {_duration(config.epoch.length_s)}"
    lines = [
        f"footfall privacy report: agent {identity.site}/{identity.agent}, mode {p.mode}",
        "",
        "What the agent hears",
        "  Probe requests: the frames phones send when they look for WiFi networks. From each",
        "  it reads the sender's address, the time, the signal strength, a sequence number and",
        "  the frame's capability fields. Nothing is decrypted; no traffic is inspected.",
        "",
        "What it keeps in memory, and for how long",
        "  - The received frames: until they are read (a fraction of a second), then the",
        "    buffer is overwritten with zeros.",
        "  - Addresses: until turned into a device id, in the same step; then zeroed.",
        "  - Device ids: SipHash-2-4 of the address under a 128-bit random key, drawn when the",
        f"    agent starts and replaced {key_life}. The key is never written to disk, logged",
        "    or sent; the old key is overwritten when the new one starts.",
    ]
    if p.strict:
        bits = p.id_bits or 0
        lines += [
            f"  - Strict mode: the key lives one window ({window}). Each device id is cut to",
            f"    at most {bits} bits ({1 << bits} possible values), fewer when fewer devices are "
            "around: the",
            "    width follows the crowd of the window before, and each window is counted at",
            f"    the widest width at which at least {COLLISION_FLOOR:.0%} of its devices share "
            "their value with",
            "    another (measured from the window's own counts); a window that cannot get",
            "    there (one or two devices) publishes no device count. The per-window table",
            "    (first and last time heard, best signal) is wiped at the end of every window",
            "    with the key. Counts are corrected for the shared values by linear counting.",
        ]
        if measured is not None:
            lines += _collisions(p.id_bits or 0, *measured)
    else:
        lines += [
            "  - The device table (first and last time heard, best signal, frames and current",
            "    visit), the estimator's links between the random addresses of one phone (by a",
            "    keyed fingerprint of the phone model and sequence numbers), and each linked",
            "    phone's current visit (first and last time heard, best signal): wiped with the",
            "    key.",
        ]
    lines += [
        "",
        "What it writes to disk",
        f"  - The spool ({identity.state_dir}/spool.sqlite3): the signed counts messages below,",
        "    until the broker has acknowledged them.",
        f"  - The signing key ({identity.config_dir}/signing.key): proves the messages come from",
        "    this agent; it says nothing about any phone.",
        "  - Never: addresses, device ids, the hashing key, network names (SSIDs).",
        "",
        "What leaves the device",
        f"  Every {window}, one signed message of counts for the window:",
        "  - frames heard (probe requests, malformed frames, late frames);",
    ]
    if p.strict:
        lines.append("  - devices heard, of which randomised (collision-corrected).")
        lines.append(
            "  - Not published in strict mode: people (arrivals, passers-by, occupancy), visits"
        )
        lines.append("    and their length: linking a phone's addresses outlives a window.")
    elif p.dp_epsilon is None:
        lines += [
            "  - people: arrivals, passers-by, people present (mean and peak); visits ended and",
            "    their length in five bands; devices heard, of which randomised (diagnostics).",
        ]
    else:
        lines.append("  - devices heard, of which randomised (diagnostics).")
    small = (
        "A count of one person, visit or device is"
        if p.suppress_below == 2
        else f"Any count of people, visits or devices from 1 to {p.suppress_below - 1} is"
    )
    lines += [
        "  - Never: devices so far today, or any figure that would differ between a phone",
        "    heard earlier today and a new one (docs/PRIVACY.md, the membership attacker).",
        f"  - {small} sent as 'suppressed', never as its value,",
        "    and so is any count from which a reader could subtract back to such a value.",
    ]
    if p.dp_epsilon is None:
        lines.append("  - No random noise is added (privacy.dp_epsilon = off).")
    else:
        lines += [
            f"  - Random noise (discrete Laplace, epsilon {p.dp_epsilon} per window) is added to "
            "every",
            "    count that shows presence: the counts of devices, and the frames heard, bounded",
            "    first (probe requests: at most a few per device; malformed and late frames: 0",
            f"    or 1). One device's presence for a whole day costs at most epsilon "
            f"{p.dp_epsilon_day}.",
        ]
        if not p.strict:
            lines.append(
                "  - The people figures are not sent under noise: one device can "
                "move them by more than noise scaled to one device can hide."
            )
    lines += [
        "  Also, retained: the agent's settings (this mode, window, thresholds) and whether it is",
        "  online. No address, device id, key, network name, fingerprint or per-device signal.",
        "",
        "Which rules this answers",
    ]
    if p.strict:
        lines += [
            "  CNIL (France), WiFi counting on legitimate interest: anonymisation at short",
            "  notice with a high collision rate. GDPR: what leaves the device is anonymous",
            "  statistics; the pseudonymous ids exist for one window, in memory only.",
        ]
    else:
        lines += [
            "  CNIL (France), WiFi counting on legitimate interest: immediate pseudonymisation",
            "  with a salted (keyed) hash, deleted within 24 hours. GDPR: the ids are",
            "  pseudonymous data (Art. 4(5)) kept in memory for at most a day; what leaves the",
            "  device is anonymous statistics.",
        ]
    lines += [
        "  PIPL (China), minimum necessary: only counts leave, nothing that identifies a person.",
        "  See docs/PRIVACY.md for the data flow, the threat model and a DPIA template.",
    ]
    return "\n".join(lines)


def _collisions(ceiling: int, name: str, windows: Sequence[WindowCounts]) -> list[str]:
    """What strict achieved on a capture: the share of devices sharing their id per window."""
    shares, none = [], 0
    for w in windows:
        bits = w.id_bits or ceiling
        crowd = linear_count(w.devices, 1 << bits)
        share = shared_share(bits, crowd)
        if share >= COLLISION_FLOOR:
            shares.append(share)
        elif w.devices:
            none += 1
    if not shares:
        return [f"    Measured on {name}: no window had devices enough to share ids."]
    return [
        f"    Measured on {name}: in the {len(shares)} windows that publish device counts, "
        f"{min(shares):.0%} to",
        f"    {max(shares):.0%} of the devices share their id (median "
        f"{statistics.median(shares):.0%}); windows with devices that publish none: {none}.",
    ]
