"""Privacy stage: what a closed window may say once it leaves the device.

Count -> **privacy** -> publish. Two modes map onto the options regulators accept for
WiFi counting (see ``docs/PRIVACY.md``):

* ``standard``: device ids are keyed hashes under a random key that lives at most 24 hours
  (local midnight, or a fixed length up to a day) and is never written anywhere; every
  sensor draws its own key; all per-device state (with the estimator's chains) is wiped
  with it. Arrivals, passers-by, visits, dwell and occupancy are published. The ids are
  pseudonymous for at most a day, then gone.
* ``strict``: nothing per device outlives one window of at most 10 minutes: the key, and
  with it the device table, is replaced every window, and device ids are truncated to
  at most :attr:`PrivacyPolicy.id_bits` bits, fewer when fewer devices are around, so that
  most devices share their value with another in every window
  (:meth:`PrivacyPolicy.anonymise`). The counts are corrected for those collisions by linear
  counting (:func:`linear_count`). No chain outlives a window either, so only the device
  diagnostics (``devices``, ``devices_randomised``) are published: no people figures.

In both modes, on the way out (:meth:`PrivacyPolicy.release`):

1. optional differential privacy: discrete Laplace noise (the two-sided geometric
   mechanism: integers, so no floating-point side channel) on every count that reveals
   presence, scaled to what one device can move in a window, with fresh operating-system
   randomness for every value. The frame counts go under noise too, bounded first:
   ``probe_requests`` counts at most :data:`~firmware_agent.stages.batch.FRAMES_PER_DEVICE` frames
   per device (``probe_requests_clipped``), ``malformed`` and ``late_frames`` say only
   whether there were any (0 or 1). The people figures and ``static_excluded`` are then
   withheld (:data:`~firmware_agent.contract.fields.DP_WITHHELD`), since one device can move
   them by more than any stated sensitivity;
2. small-count suppression: a count from 1 to *k*-1 is published as ``null``, and
   so is a count that would let a reader subtract back to one (complementary suppression
   over the message's additive relations, including the never-published count of devices
   with global addresses, ``devices - devices_randomised``); ``occupancy_mean`` goes with
   ``occupancy_peak`` (it is at most the peak).

A window without data (``no_data``) is published with every figure null.

Without noise, frame counts (``probe_requests``, ``malformed``, ``late_frames``) are
published as they are: they describe the radio, not how many devices.

**No membership oracle** (issue 17, ``tests/agent/test_injection.py``): no published figure may
differ between "this address was heard earlier in the epoch" and "this address is new".
``devices_epoch`` (distinct devices so far in the epoch) did exactly that: three probe
requests under a candidate address in a quiet window, and it stays put if the phone was
here earlier today and rises by one if not. So did counts v1's estimate, ``people_est``: a
chain counted once it had lasted ``estimate.min_dwell_s`` since it was *first heard in the
epoch*. They are never published (:data:`~firmware_agent.contract.fields.NEVER_PUBLISHED`);
every published figure must be a function of the window alone, and the epoch label of public
values (:func:`epoch_label`).

The fields and their rules (what each mode publishes, what noise withholds, the sums that must
hold, what is never published) are the contract's one catalogue,
:mod:`firmware_agent.contract.fields`: the agent releases by it and the audit
(:mod:`firmware_agent.tools.audit`) checks by the same objects.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.fields import (
    COUNTS,
    DP_WITHHELD,
    FRAME_COUNTS,
    IMPLICIT,
    RELATIONS,
    STANDARD_PUBLISHES,
    STRICT_PUBLISHES,
    WITH_PEAK,
)
from firmware_agent.contract.resolve import setting
from firmware_agent.stages.batch import FRAMES_PER_DEVICE, DeviceBatch, WindowCounts

__all__ = [
    "COLLISION_FLOOR",
    "MODES",
    "STANDARD_MAX_KEY_S",
    "STRICT_MAX_ID_BITS",
    "STRICT_MAX_WINDOW_S",
    "SUPPRESS_FLOOR",
    "PrivacyPolicy",
    "discrete_laplace",
    "epoch_label",
    "flatten_counts",
    "linear_count",
    "shared_share",
    "suppress",
    "truncate_ids",
]

Mode = Literal["standard", "strict"]
MODES: tuple[Mode, ...] = ("standard", "strict")
STRICT_MAX_WINDOW_S = 600  # CNIL: anonymised "within minutes"
STANDARD_MAX_KEY_S = 86400  # CNIL: pseudonymised, then anonymised or deleted within 24 hours
SUPPRESS_FLOOR = 2  # the lowest k of every mode: a count of one device is that device
# Strict: the widest truncated id (4,096 values); wider, and most devices keep their own.
STRICT_MAX_ID_BITS = 12
# Strict: at least this share of a window's devices share their id with another, at the
# width its counts are taken at; a window that cannot get there publishes no device count.
COLLISION_FLOOR = 0.5
_MIN_ID_BITS = 4

# What one device moves the bounded frame counts by, under noise.
_FRAME_SENSITIVITY = FRAMES_PER_DEVICE + 2  # probe_requests_clipped; malformed, late: 0 or 1


def truncate_ids(batch: DeviceBatch, bits: int) -> None:
    """Strict: keep ``bits`` bits of every device id (in place; 0, no address, stays 0) and
    drop the keyed fingerprints, so no row carries more than a shared value."""
    present = batch.device != 0
    np.bitwise_and(batch.device, np.uint64((1 << bits) - 1), out=batch.device)
    np.add(batch.device, np.uint64(1), out=batch.device, where=present)
    batch.fp.fill(0)


_RANDOM = secrets.SystemRandom()  # every draw reads the operating system's randomness


def shared_share(bits: int, crowd: float) -> float:
    """The expected share of ``crowd`` devices whose ``bits``-bit id another of them has too:
    ``1 - (1 - 2^-bits)^(crowd - 1)`` (0 for a crowd of one or none)."""
    return max(0.0, 1.0 - (1.0 - 2.0**-bits) ** (crowd - 1)) if crowd > 1 else 0.0


def linear_count(occupied: int, buckets: int) -> float:
    """Distinct items estimated from ``occupied`` of ``buckets`` equally likely values
    (Whang et al., 1990: ``m ln(m / empty)``). All occupied: the estimate for one empty."""
    empty = max(buckets - occupied, 1)
    return buckets * math.log(buckets / empty)


def discrete_laplace(scale_epsilon: float) -> int:
    """One draw of the two-sided geometric (discrete Laplace) noise with ``P(x) ∝ a^|x|``,
    ``a = exp(-scale_epsilon)``, from the operating system's randomness."""
    a = math.exp(-scale_epsilon)
    log_a = math.log(a)

    def geometric() -> int:  # failures before the first success, success probability 1 - a
        u = 1.0 - _RANDOM.random()  # in (0, 1]
        return int(math.log(u) / log_a)

    return geometric() - geometric()


def _epsilon(text: str) -> float | None:
    """``privacy.dp_epsilon``: None for 'off'."""
    value = text.strip().lower()
    try:
        return None if value in ("off", "", "none") else float(value)
    except ValueError as exc:
        raise ConfigError(
            f"privacy.dp_epsilon must be 'off' or a number such as '0.5', got {value!r}"
        ) from exc


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """The privacy settings, checked against the rules of their mode where they are made."""

    mode: Mode = setting(
        "standard",
        "'standard' (keyed device ids for at most 24 h: arrivals, visits, dwell, occupancy) or "
        "'strict' (nothing per device outlives a window of at most 10 min; truncated ids).",
        choices=MODES,
    )
    suppress_below: int = setting(
        5,
        "k: device counts from 1 to k-1 are published as suppressed, with any count that "
        "would give them back by subtraction. 2 to 1000.",
    )
    dp_epsilon: float | None = setting(
        "off",
        "Per-window epsilon of discrete Laplace noise on published device counts, or 'off'.",
        parse=_epsilon,
    )
    expected_devices: int = setting(
        100,
        "Strict mode: devices expected in a window at busy times; sets the bits kept of a "
        "device id so that most devices share their value.",
    )
    window_s: int = 300
    key_lifetime_s: int = STANDARD_MAX_KEY_S
    lateness_s: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode must be 'standard' or 'strict', got {self.mode!r}")
        if not SUPPRESS_FLOOR <= self.suppress_below <= 1000:
            raise ConfigError(
                f"privacy.suppress_below must be from {SUPPRESS_FLOOR} to 1000 (a count of one "
                f"device is that device; every mode suppresses it), got {self.suppress_below}"
            )
        if self.dp_epsilon is not None and not 0 < self.dp_epsilon <= 10:
            raise ConfigError(
                f"privacy.dp_epsilon must be 'off' or a number above 0 and at most 10, "
                f"got {self.dp_epsilon}"
            )
        if not 1 <= self.expected_devices <= 1 << 16:
            raise ConfigError(
                f"privacy.expected_devices must be from 1 to {1 << 16}, got {self.expected_devices}"
            )
        if self.mode == "strict":
            if self.expected_devices >= 2 << STRICT_MAX_ID_BITS:
                raise ConfigError(
                    f"privacy.mode 'strict' keeps ids of at most {STRICT_MAX_ID_BITS} bits, so "
                    f"that most devices share theirs: privacy.expected_devices must be below "
                    f"{2 << STRICT_MAX_ID_BITS}, got {self.expected_devices}"
                )
            if self.window_s > STRICT_MAX_WINDOW_S:
                raise ConfigError(
                    f"privacy.mode 'strict' keeps nothing per device beyond one window of at most "
                    f"{STRICT_MAX_WINDOW_S // 60} minutes (anonymisation within minutes): "
                    f"count.window_s {self.window_s} breaks that rule"
                )
            if self.window_s + self.lateness_s > STRICT_MAX_WINDOW_S:
                raise ConfigError(
                    "privacy.mode 'strict' replaces its key once a window's late frames are in: "
                    f"count.window_s + count.lateness_s must be at most {STRICT_MAX_WINDOW_S} s, "
                    f"got {self.window_s} + {self.lateness_s}"
                )
            if self.key_lifetime_s != self.window_s:
                raise ConfigError(
                    "privacy.mode 'strict' replaces the key and the device table every window: "
                    f"epoch.length must be left unset (it follows count.window_s, "
                    f"{self.window_s}), got {self.key_lifetime_s}"
                )
        elif self.key_lifetime_s > STANDARD_MAX_KEY_S:
            raise ConfigError(
                "privacy.mode 'standard' keeps a key and device ids for at most 24 hours "
                f"(pseudonymised, then deleted): epoch.length {self.key_lifetime_s} s breaks "
                "that rule"
            )

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    @property
    def id_bits(self) -> int | None:
        """Strict: the widest id kept (the declared ``id_bits``): the most bits that leave at
        least as many devices of the expected crowd as values; each window's width follows
        its own crowd below it (:meth:`anonymise`, :meth:`next_bits`). None in standard."""
        if not self.strict:
            return None
        bits = int(math.log2(max(self.expected_devices, 2)))
        return min(max(bits, _MIN_ID_BITS), STRICT_MAX_ID_BITS)

    def shared_share(self) -> float | None:
        """Strict: the expected share of the expected crowd whose truncated id another
        device of the crowd has too, at the declared width; None in standard."""
        bits = self.id_bits
        return None if bits is None else shared_share(bits, self.expected_devices)

    @property
    def sensitivity(self) -> int:
        """The most one device id can move the sum of the counts published under noise (as
        counted, before strict mode's correction): the L1 sensitivity the noise is scaled
        to. Under noise both modes publish ``devices`` and ``devices_randomised`` only (the
        people figures are withheld, :data:`~firmware_agent.contract.fields.DP_WITHHELD`): one
        each. In strict mode a truncated id shared with another device can gain the randomised
        flag while devices does not move: 2 still. Plus the frame counts, bounded: at most
        :data:`~firmware_agent.stages.batch.FRAMES_PER_DEVICE` probe requests, and 1 each for
        whether there were malformed or late frames."""
        return 2 + _FRAME_SENSITIVITY

    @property
    def dp_epsilon_day(self) -> float | None:
        """Budget one device can spend in 24 hours: epsilon times the windows of a day."""
        if self.dp_epsilon is None:
            return None
        return round(self.dp_epsilon * 86400 / self.window_s, 6)

    @property
    def publishes(self) -> tuple[str, ...]:
        """The optional counts v2 figures this policy publishes (strict, or under noise: the
        device diagnostics only)."""
        if self.strict:
            return STRICT_PUBLISHES
        if self.dp_epsilon is not None:
            return tuple(name for name in STANDARD_PUBLISHES if name not in DP_WITHHELD)
        return STANDARD_PUBLISHES

    def meta(self) -> dict[str, object]:
        """The ``privacy`` object of the meta message."""
        return {
            "mode": self.mode,
            "device_hash": "siphash-2-4",
            "key_bits": 128,
            "key_lifetime_s": self.key_lifetime_s,
            "id_bits": self.id_bits,
            "suppress_below": self.suppress_below,
            "dp_epsilon": self.dp_epsilon,
            "dp_epsilon_day": self.dp_epsilon_day,
            "published": {name: name in self.publishes for name in STANDARD_PUBLISHES},
        }

    def anonymise(
        self,
        window: WindowCounts,
        ids: NDArray[np.uint64],
        randomised: NDArray[np.bool_],
        bits: int,
    ) -> WindowCounts:
        """Strict: the window counted from its truncated ids (``bits`` wide, as heard) at the
        widest width at most ``bits`` at which at least :data:`COLLISION_FLOOR` of its crowd
        shares its value with another device. The share at a width is measured from the
        window's own counts at that width, as an auditor could: the crowd ``n`` by linear
        counting over the ``m`` values its ids occupy, then ``1 - (1 - 1/m)^(n - 1)``. A
        window that reaches the floor at no width (a crowd of one or two) keeps its best and
        publishes no device count (:meth:`release`). The counts are the occupied values (all,
        with a randomised address), corrected on release by linear counting at that width."""
        values = (ids - np.uint64(1)).astype(np.uint64)  # truncate_ids adds 1 (0: no address)
        shares = {}
        for width in range(bits, 0, -1):
            occupied = len(np.unique(values & np.uint64((1 << width) - 1)))
            shares[width] = shared_share(width, linear_count(occupied, 1 << width))
            if shares[width] >= COLLISION_FLOOR:
                break
        width = max(shares, key=lambda b: (shares[b] >= COLLISION_FLOOR, b, shares[b]))
        if shares[width] < COLLISION_FLOOR:
            width = max(shares, key=shares.__getitem__)
        coarse = values & np.uint64((1 << width) - 1)
        return replace(
            window,
            devices=len(np.unique(coarse)),
            devices_randomised=len(np.unique(coarse[randomised])),
            id_bits=width,
            shared=shares[width] if len(values) else None,
        )

    def next_bits(self, ids: int, bits: int) -> int:
        """Strict: the width for the next window's ids, from this window's ``ids`` distinct
        ids heard ``bits`` wide: the widest, up to :attr:`id_bits`, at which at least
        :data:`COLLISION_FLOOR` of a crowd that size (linear counting) would share their
        value; the widest at once when the crowd filled three quarters of the values (it
        outgrew them, and linear counting can no longer tell by how much)."""
        ceiling = self.id_bits or 0
        if ids >= (3 << bits) // 4:
            return ceiling
        crowd = linear_count(ids, 1 << bits)
        width = 1
        while width < ceiling and shared_share(width + 1, crowd) >= COLLISION_FLOOR:
            width += 1
        return width

    def correct(self, window: WindowCounts) -> WindowCounts:
        """Strict: a window counted on truncated ids, corrected for their collisions (see
        :meth:`_corrected`); unchanged in standard."""
        if not self.strict:
            return window
        c = self._corrected(
            {"devices": window.devices, "devices_randomised": window.devices_randomised},
            window.id_bits,
        )
        return replace(window, devices=c["devices"], devices_randomised=c["devices_randomised"])

    def _corrected(self, counts: Mapping[str, int], bits: int | None) -> dict[str, int]:
        """Linear counting on the truncated ids (``bits`` wide; the declared width if None):
        the occupied values give the devices, the values with a randomised address give
        those."""
        m = 1 << (bits if bits is not None else self.id_bits or 0)
        devices = round(linear_count(counts["devices"], m))
        return dict(counts) | {
            "devices": devices,
            "devices_randomised": min(
                round(linear_count(counts["devices_randomised"], m)), devices
            ),
        }

    def noised_counts(self, window: WindowCounts) -> dict[str, int]:
        """The counts of ``window`` the noise goes on, as counted (dwell bands as
        ``dwell_minutes.<band>``): the counts this policy publishes and, under noise, the
        bounded frame counts (nothing in a window without data, unless under noise: a silent
        window is noised like any other, see :meth:`release`). Under noise one device id
        moves their sum by at most :attr:`sensitivity`."""
        if window.no_data and self.dp_epsilon is None:
            return {}
        counts = _counts(self._publishable(replace(window, no_data=False)))
        if self.dp_epsilon is not None:
            counts |= {
                "probe_requests": window.probe_requests_clipped,
                "malformed": min(window.malformed, 1),
                "late_frames": min(window.late_frames, 1),
            }
        return counts

    def _publishable(self, window: WindowCounts) -> dict[str, object]:
        """The window's fields this policy may publish, flattened: the header, the frame
        counts, ``no_data`` and the optional figures of :attr:`publishes`."""
        optional = set(STANDARD_PUBLISHES) - set(self.publishes)
        return {
            name: value
            for name, value in flatten_counts(window.as_dict()).items()
            if name.partition(".")[0] not in optional
        }

    def release(self, window: WindowCounts) -> dict[str, object]:
        """What the window may say outside the device: the counts part of a counts message.

        Noise goes on the counts as counted (in strict mode, on the truncated ids, where one
        device moves each count by at most one), then strict mode's collision correction and
        the suppression follow as post-processing, which spends no privacy budget. A window
        without data is published as it is: every figure null (a gap), nothing to hide.

        Under noise, whether a window is a gap is read off its *noised* frame counts (all 0,
        at a sensor that normally hears: the rule without noise, applied to what is
        published), since the exact rule tells one device's single frame from none."""
        if window.no_data and self.dp_epsilon is None:
            return _unflatten(self._publishable(window))
        counts = self.noised_counts(window)
        if self.dp_epsilon is not None:
            noise = self.dp_epsilon / self.sensitivity
            counts = {name: max(0, n + discrete_laplace(noise)) for name, n in counts.items()}
            silent = not any(counts[name] for name in FRAME_COUNTS)
            window = replace(window, no_data=window.silence_is_gap and silent)
        frames = {name: counts.pop(name) for name in FRAME_COUNTS if name in counts}
        flat = self._publishable(window)
        if window.no_data:
            return _unflatten(flat | frames)
        if self.strict:
            counts = self._corrected(counts, window.id_bits)
        hidden = suppress(counts, self.suppress_below)
        if window.shared is not None and window.shared < COLLISION_FLOOR:
            hidden = set(counts)  # strict could not make this window's devices share ids
        flat.update({name: None if name in hidden else n for name, n in counts.items()})
        if "occupancy_peak" in hidden:
            flat.update(dict.fromkeys(WITH_PEAK))  # at most the peak: as small
        return _unflatten(flat | frames)


def epoch_label(public_key: bytes, epoch_start: int) -> str:
    """The public label of an epoch: the first 8 bytes (hex) of SHA-256 over the agent's
    public signing key and the epoch's start (Unix seconds, 8 bytes big endian). Anyone with
    the public key can recompute it (the audit does), so it carries no bit of its own: not a
    key, not an id, nothing chosen. It only tells epochs, and agents, apart."""
    digest = hashlib.sha256(b"footfall-epoch\0" + public_key + epoch_start.to_bytes(8, "big"))
    return digest.hexdigest()[:16]


def suppress(counts: Mapping[str, int], k: int) -> set[str]:
    """The counts to publish as null: those from 1 to k-1, then, until none is left, one
    more count of every relation that would give a hidden small count back by subtraction
    (the smallest published part, preferring non-zero ones; else the total)."""
    cells = dict(counts)
    (global_,) = IMPLICIT
    cells[global_] = cells.get("devices", 0) - cells.get("devices_randomised", 0)
    small = {name for name, v in cells.items() if 0 < v < k}
    hidden = small | set(IMPLICIT)
    changed = True
    while changed:
        changed = False
        for total, parts in RELATIONS:
            unseen = [c for c in (total, *parts) if c in cells and c in hidden]
            if len(unseen) != 1 or unseen[0] not in small:
                continue
            shown = [p for p in parts if p in cells and p not in hidden]
            choice = min(shown, key=lambda p: (cells[p] == 0, cells[p])) if shown else total
            hidden.add(choice)
            small.add(choice)  # it now hides a small count: its own relations must hold
            changed = True
    return hidden - set(IMPLICIT)


def flatten_counts(counts: Mapping[str, object]) -> dict[str, object]:
    """Dwell bands as ``dwell_minutes.<band>``, the rest as they are."""
    flat: dict[str, object] = {}
    for name, value in counts.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}.{band}": n for band, n in value.items()})
        else:
            flat[name] = value
    return flat


def _counts(flat: Mapping[str, object]) -> dict[str, int]:
    return {name: cast(int, v) for name, v in flat.items() if name in COUNTS}


def _unflatten(flat: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in flat.items():
        outer, _, inner = name.partition(".")
        if inner:
            cast(dict[str, object], out.setdefault(outer, {}))[inner] = value
        else:
            out[name] = value
    return out
