"""Privacy stage: what a closed window may say once it leaves the device.

Count -> **privacy** -> publish. Two modes map onto the options regulators accept for
WiFi counting (see ``docs/PRIVACY.md``):

* ``standard``: device ids are keyed hashes under a random key that lives at most 24 hours
  (local midnight, or a fixed length up to a day) and is never written anywhere; every
  sensor draws its own key; all per-device state is wiped with it. Dwell, visits and
  unique-today are published. The ids are pseudonymous for at most a day, then gone.
* ``strict``: nothing per device outlives one window of at most 10 minutes: the key, and
  with it the device table, is replaced every window, and device ids are truncated to
  :attr:`PrivacyPolicy.id_bits` bits, chosen from the expected crowd so that most devices
  share their value with another. The counts are corrected for those collisions by linear
  counting (:func:`linear_count`); dwell, visits and unique-today are not published.

In both modes, on the way out (:meth:`PrivacyPolicy.release`):

1. optional differential privacy: discrete Laplace noise (the two-sided geometric
   mechanism: integers, so no floating-point side channel) on every device count, scaled
   to the counts one device can move in a window, with fresh operating-system randomness
   for every value; the estimate (``people_est``, ``static_excluded``, ``people``) is then
   withheld, since one device can move it by more than any stated sensitivity;
2. small-count suppression: a device count from 1 to *k*-1 is published as ``null``, and
   so is a count that would let a reader subtract back to one (complementary suppression
   over the message's additive relations, including the never-published count of devices
   with global addresses, ``devices - devices_randomised``).

Frame counts (``probe_requests``, ``malformed``, ``late_frames``) describe the radio, not
how many devices; they are published as they are.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np

from firmware_agent.anonymize import DeviceBatch
from firmware_agent.count import DWELL_BANDS, WindowCounts
from firmware_agent.errors import ConfigError

__all__ = [
    "DP_WITHHELD",
    "MODES",
    "STANDARD_MAX_KEY_S",
    "STRICT_MAX_WINDOW_S",
    "PrivacyPolicy",
    "discrete_laplace",
    "flatten_counts",
    "linear_count",
    "suppress",
    "truncate_ids",
]

Mode = Literal["standard", "strict"]
MODES: tuple[Mode, ...] = ("standard", "strict")
STRICT_MAX_WINDOW_S = 600  # CNIL: anonymised "within minutes"
STANDARD_MAX_KEY_S = 86400  # CNIL: pseudonymised, then anonymised or deleted within 24 hours
_MIN_ID_BITS, _MAX_ID_BITS = 4, 16

# The additive relations of a counts message: total = sum of parts. "devices_global"
# (devices with a global address) is never published but follows from the other two.
_IMPLICIT = ("devices_global",)
_RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("devices", ("visitors", "passersby")),
    ("devices", ("devices_randomised", "devices_global")),
    ("visits_ended", tuple(f"dwell_minutes.{band}" for band in DWELL_BANDS)),
)
# Device counts: what suppression and noise apply to. Dwell bands go by "dwell_minutes.<band>".
_DEVICE_COUNTS = (
    "devices",
    "devices_randomised",
    "visitors",
    "passersby",
    "visits_ended",
    *(f"dwell_minutes.{band}" for band in DWELL_BANDS),
    "devices_epoch",
    "people_est",
    "static_excluded",
    "people",
)
# Withheld under differential privacy: one device id can move them by an unbounded amount
# (the learnt signal threshold, chain linking: docs/PRIVACY.md), so no noise scale fits them.
STANDARD_PUBLISHES = (
    "arrivals",
    "passersby",
    "visits_ended",
    "dwell_minutes",
    "occupancy_mean",
    "occupancy_peak",
    "calibrated",
    "devices",
    "devices_randomised",
    "static_excluded",
)
"""The optional counts v2 figures each mode publishes (meta.privacy.published)."""
STRICT_PUBLISHES = ("devices", "devices_randomised")
DP_WITHHELD = ("people_est", "static_excluded", "people")
_STRICT_OMITS = ("visits_ended", "dwell_minutes", "devices_epoch", *DP_WITHHELD)


def truncate_ids(batch: DeviceBatch, bits: int) -> None:
    """Strict: keep ``bits`` bits of every device id (in place; 0, no address, stays 0) and
    drop the keyed fingerprints, so no row carries more than a shared value."""
    present = batch.device != 0
    np.bitwise_and(batch.device, np.uint64((1 << bits) - 1), out=batch.device)
    np.add(batch.device, np.uint64(1), out=batch.device, where=present)
    batch.fp.fill(0)


_RANDOM = secrets.SystemRandom()  # every draw reads the operating system's randomness


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


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """The privacy settings, checked against the rules of their mode where they are made."""

    mode: Mode = "standard"
    suppress_below: int = 5
    dp_epsilon: float | None = None
    expected_devices: int = 100
    window_s: int = 300
    key_lifetime_s: int = STANDARD_MAX_KEY_S
    lateness_s: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode must be 'standard' or 'strict', got {self.mode!r}")
        if not 2 <= self.suppress_below <= 1000:
            raise ConfigError(
                "privacy.suppress_below must be from 2 to 1000 (a count of one device is that "
                f"device; every mode suppresses it), got {self.suppress_below}"
            )
        if self.dp_epsilon is not None and not 0 < self.dp_epsilon <= 10:
            raise ConfigError(
                f"privacy.dp_epsilon must be 'off' or a number above 0 and at most 10, "
                f"got {self.dp_epsilon}"
            )
        if not 1 <= self.expected_devices <= 1 << _MAX_ID_BITS:
            raise ConfigError(
                f"privacy.expected_devices must be from 1 to {1 << _MAX_ID_BITS}, "
                f"got {self.expected_devices}"
            )
        if self.mode == "strict":
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

    @classmethod
    def from_settings(
        cls, values: Mapping[str, int | str], window_s: int, key_lifetime_s: int, lateness_s: int
    ) -> PrivacyPolicy:
        text = str(values["privacy.dp_epsilon"]).strip().lower()
        try:
            epsilon = None if text in ("off", "", "none") else float(text)
        except ValueError as exc:
            raise ConfigError(
                f"privacy.dp_epsilon must be 'off' or a number such as '0.5', got {text!r}"
            ) from exc
        mode = str(values["privacy.mode"]).strip().lower()
        if mode not in MODES:
            raise ConfigError(f"privacy.mode must be 'standard' or 'strict', got {mode!r}")
        return cls(
            mode=mode,  # checked just above
            suppress_below=int(values["privacy.suppress_below"]),
            dp_epsilon=epsilon,
            expected_devices=int(values["privacy.expected_devices"]),
            window_s=window_s,
            key_lifetime_s=key_lifetime_s,
            lateness_s=lateness_s,
        )

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    @property
    def id_bits(self) -> int | None:
        """Strict: bits kept of a device id: the most that leave at least as many devices of
        the expected crowd as values (one to two per value: most devices share theirs, see
        :meth:`shared_share`); None in standard."""
        if not self.strict:
            return None
        bits = int(math.log2(max(self.expected_devices, 2)))
        return min(max(bits, _MIN_ID_BITS), _MAX_ID_BITS)

    def shared_share(self) -> float | None:
        """Strict: the expected share of the expected crowd whose truncated id another
        device of the crowd has too; None in standard."""
        bits = self.id_bits
        if bits is None:
            return None
        return 1.0 - (1.0 - 1.0 / (1 << bits)) ** (self.expected_devices - 1)

    @property
    def sensitivity(self) -> int:
        """The most one device id can move the sum of the published device counts of a window
        (as counted, before strict mode's correction): the L1 sensitivity the noise is scaled
        to. Standard: one each of devices, devices_randomised, visitors or passersby,
        visits_ended, one dwell band (a device's visit ends at most once per window close),
        devices_epoch; the estimate is withheld under noise (:data:`DP_WITHHELD`). Strict:
        devices, devices_randomised, visitors/passersby; on a truncated id shared with another
        device, the id's randomised flag and its class can change (visitors +1, passersby -1)
        while devices does not: 3 still."""
        return 3 if self.strict else 6

    @property
    def dp_epsilon_day(self) -> float | None:
        """Budget one device can spend in 24 hours: epsilon times the windows of a day."""
        if self.dp_epsilon is None:
            return None
        return round(self.dp_epsilon * 86400 / self.window_s, 6)

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
            "published": {
                name: name in (STRICT_PUBLISHES if self.strict else STANDARD_PUBLISHES)
                for name in STANDARD_PUBLISHES
            },
        }

    def correct(self, window: WindowCounts) -> WindowCounts:
        """Strict: a window counted on truncated ids, corrected for their collisions (see
        :meth:`_corrected`); unchanged in standard."""
        if not self.strict:
            return window
        fields = ("devices", "devices_randomised", "visitors", "passersby")
        c = self._corrected({name: getattr(window, name) for name in fields})
        return replace(
            window,
            devices=c["devices"],
            devices_randomised=c["devices_randomised"],
            visitors=c["visitors"],
            passersby=c["passersby"],
        )

    def _corrected(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Linear counting on the truncated ids: the occupied values give the devices, the
        values with a randomised address give those, the values with a visitor the visitors
        (a value shared by a visitor and a passer-by counts once for each)."""
        m = 1 << (self.id_bits or 0)
        devices = round(linear_count(counts["devices"], m))
        visitors = min(round(linear_count(counts["visitors"], m)), devices)
        return dict(counts) | {
            "devices": devices,
            "devices_randomised": min(
                round(linear_count(counts["devices_randomised"], m)), devices
            ),
            "visitors": visitors,
            "passersby": devices - visitors,
        }

    def device_counts(self, window: WindowCounts) -> dict[str, int]:
        """The device counts of ``window`` this policy publishes, as counted (dwell bands as
        ``dwell_minutes.<band>``): what the noise goes on. One device id moves their sum by
        at most :attr:`sensitivity`."""
        return _device_counts(self._publishable(window))

    def _publishable(self, window: WindowCounts) -> dict[str, object]:
        """The window's fields this policy may publish, flattened."""
        omitted: tuple[str, ...] = _STRICT_OMITS if self.strict else ()
        if self.dp_epsilon is not None:
            omitted += DP_WITHHELD
        return {
            name: value
            for name, value in flatten_counts(window.as_dict()).items()
            if name.partition(".")[0] not in omitted
        }

    def release(self, window: WindowCounts) -> dict[str, object]:
        """What the window may say outside the device: the counts part of a counts message.

        Noise goes on the counts as counted (in strict mode, on the truncated ids, where one
        device moves each count by at most one), then strict mode's collision correction and
        the suppression follow as post-processing, which spends no privacy budget."""
        flat = self._publishable(window)
        counts = _device_counts(flat)
        if self.dp_epsilon is not None:
            noise = self.dp_epsilon / self.sensitivity
            counts = {name: max(0, n + discrete_laplace(noise)) for name, n in counts.items()}
        if self.strict:
            counts = self._corrected(counts)
        hidden = suppress(counts, self.suppress_below)
        flat.update({name: None if name in hidden else n for name, n in counts.items()})
        return _unflatten(flat)


def suppress(counts: Mapping[str, int], k: int) -> set[str]:
    """The device counts to publish as null: those from 1 to k-1, then, until none is
    left, one more count of every relation that would give a hidden small count back by
    subtraction (the smallest published part, preferring non-zero ones; else the total).
    ``people`` goes with ``people_est``: it is a linear function of it."""
    cells = dict(counts)
    cells["devices_global"] = cells.get("devices", 0) - cells.get("devices_randomised", 0)
    small = {name for name, v in cells.items() if 0 < v < k}
    hidden = small | set(_IMPLICIT)
    changed = True
    while changed:
        changed = False
        for a, b in (("people_est", "people"), ("people", "people_est")):
            if a in hidden and b in cells and b not in hidden:
                hidden.add(b)
                small.add(b)  # as sensitive as what it is computed from
        for total, parts in _RELATIONS:
            unseen = [c for c in (total, *parts) if c in cells and c in hidden]
            if len(unseen) != 1 or unseen[0] not in small:
                continue
            shown = [p for p in parts if p in cells and p not in hidden]
            choice = min(shown, key=lambda p: (cells[p] == 0, cells[p])) if shown else total
            hidden.add(choice)
            small.add(choice)  # it now hides a small count: its own relations must hold
            changed = True
    return hidden - set(_IMPLICIT)


def flatten_counts(counts: Mapping[str, object]) -> dict[str, object]:
    """Dwell bands as ``dwell_minutes.<band>``, the rest as they are."""
    flat: dict[str, object] = {}
    for name, value in counts.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}.{band}": n for band, n in value.items()})
        else:
            flat[name] = value
    return flat


def _device_counts(flat: Mapping[str, object]) -> dict[str, int]:
    return {name: cast(int, v) for name, v in flat.items() if name in _DEVICE_COUNTS}


def _unflatten(flat: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in flat.items():
        outer, _, inner = name.partition(".")
        if inner:
            cast(dict[str, object], out.setdefault(outer, {}))[inner] = value
        else:
            out[name] = value
    return out
