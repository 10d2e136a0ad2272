"""What ``strict`` privacy costs in accuracy against ``standard``, on the shared lab captures.

Replays every lab capture (``fryza_*`` under ``../shared/data/pcaps``, see
tests/support/accuracy.py)
and the bundled sample through the agent's pipeline (:func:`firmware_agent.tools.evaluate.replay`)
once in ``standard`` and ``--repeat`` times in ``strict`` per ``privacy.expected_devices``
(every strict run draws its own keys, so its collisions differ; scores are means over the
runs), 5-minute windows, midnight epochs in UTC, and compares the windows the pipeline
yields, before the release step (no suppression, no noise):

1. strict against standard: ``devices``, ``visitors`` and ``devices_randomised``, window by
   window, over the windows where standard counts 3 devices or more (MAE over those; MAPE
   over those of them where standard's value of that count is 3 or more, as
   :func:`firmware_agent.tools.evaluate.score` does), and the mean signed error (bias);
2. against the lab's ground truth (people in the room): standard ``people_est``, standard
   ``visitors`` and strict ``visitors``, uncalibrated (MAE over every window the truth covers,
   MAPE over those with 3 people or more);
3. the cost of small-count suppression (``privacy.suppress_below`` 5): the share of windows
   whose ``visitors`` and ``devices`` :meth:`PrivacyPolicy.release` publishes as null.

Usage: ``nice .venv/bin/python bench/bench_privacy.py [PCAPS_DIR] [--expected 50 100 200]
[--repeat 5]``
(default: ``$FOOTFALL_SHARED/data/pcaps``, else ``../shared/data/pcaps`` beside the checkout).
Progress goes to stderr, the tables (Markdown) to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support.accuracy, when run as a script

from firmware_agent.cli import BUNDLED_SAMPLE  # noqa: E402
from firmware_agent.service.config import AgentConfig  # noqa: E402
from firmware_agent.settings import load_config  # noqa: E402
from firmware_agent.stages.batch import WindowCounts  # noqa: E402
from firmware_agent.tools.evaluate import Scores, Truth, replay, score  # noqa: E402
from tests.support.accuracy import LAB, lab_truth  # noqa: E402

SHARED = Path(os.environ.get("FOOTFALL_SHARED", REPO.parent / "shared"))  # as tests/conftest.py
WINDOW_S = 300
MIN_DEVICES = 3  # windows compared: standard counts at least this many devices
K = 5

Metric = Callable[[WindowCounts], int]
METRICS: tuple[Metric, ...] = (  # the table's order
    lambda w: w.devices,
    lambda w: w.visitors,
    lambda w: w.devices_randomised,
)


def config(mode: str, expected_devices: int = 100) -> AgentConfig:
    return load_config(
        None,
        environ={},
        overrides={
            "count.window_s": WINDOW_S,
            "epoch.timezone": "UTC",
            "privacy.mode": mode,
            "privacy.expected_devices": expected_devices,
            "privacy.suppress_below": K,
        },
    )


@dataclass(frozen=True, slots=True)
class Run:
    """One capture replayed in one mode."""

    config: AgentConfig
    windows: dict[int, WindowCounts]  # by window start
    seconds: float


@dataclass(frozen=True, slots=True)
class Compared:
    """One count of strict runs against standard, averaged over the runs."""

    mae: float
    mape: float | None
    bias: float  # mean of strict - standard
    windows: int


def run(capture: Path, cfg: AgentConfig) -> Run:
    start = time.perf_counter()
    result = replay(capture, cfg)
    corrected = (cfg.privacy.correct(w) for w in result.windows)  # strict: for collisions
    return Run(cfg, {w.window_start: w for w in corrected}, time.perf_counter() - start)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None


def against(strict: Sequence[Run], standard: Run, metric: Metric) -> Compared | None:
    """Strict's metric scored against standard's over the busy windows, and the bias."""
    found: list[tuple[Scores, float]] = []
    for one in strict:
        starts = [s for s, w in standard.windows.items()
                  if w.devices >= MIN_DEVICES and s in one.windows]  # fmt: skip
        if not starts:
            return None
        got = [metric(one.windows[s]) for s in starts]
        ref = [metric(standard.windows[s]) for s in starts]
        bias = sum(g - r for g, r in zip(got, ref, strict=True)) / len(starts)
        found.append((score(got, ref), bias))
    return Compared(
        mae=sum(s.mae for s, _ in found) / len(found),
        mape=_mean([s.mape for s, _ in found]),
        bias=sum(b for _, b in found) / len(found),
        windows=found[0][0].windows,
    )


def vs_truth(
    runs: Sequence[Run], truth: Truth, metric: Callable[[WindowCounts], float]
) -> tuple[float, float | None, int]:
    """MAE, MAPE and windows of a metric against the truth, averaged over the runs."""
    found: list[Scores] = []
    for one in runs:
        pairs = [(metric(w), t) for w in one.windows.values()
                 if (t := truth.window(w.window_start, w.window_s)) is not None]  # fmt: skip
        found.append(score([p for p, _ in pairs], [t for _, t in pairs]))
    return (
        sum(s.mae for s in found) / len(found),
        _mean([s.mape for s in found]),
        found[0].windows,
    )


def null_share(runs: Sequence[Run], field: str) -> float:
    """Share (%) of the runs' windows whose ``field`` the release step publishes as null."""
    hidden = total = 0
    for one in runs:
        policy = one.config.privacy
        for w in one.windows.values():
            hidden += policy.release(w).get(field, 0) is None
            total += 1
    return 100 * hidden / max(total, 1)


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mae_mape(found: tuple[float, float | None, int]) -> str:
    return f"{_f(found[0])} | {_f(found[1], 1)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pcaps", nargs="?", type=Path, default=SHARED / "data" / "pcaps")
    parser.add_argument("--expected", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--repeat", type=int, default=5, help="strict runs per setting")
    args = parser.parse_args(argv)
    pcaps: Path = args.pcaps.resolve()
    lab = [(name, pcaps / f"{name}_anonymized.pcap") for name in LAB]
    missing = [str(p) for _, p in lab if not p.exists()]
    if missing:
        print(f"no lab captures ({', '.join(missing)}): the sample only", file=sys.stderr)
        lab = []
    captures = [*lab, ("sample (bundled, synthetic)", BUNDLED_SAMPLE)]
    truth = lab_truth(pcaps) if lab else None
    expected: list[int] = args.expected
    repeat: int = max(args.repeat, 1)

    standard: dict[str, Run] = {}
    strict: dict[tuple[str, int], list[Run]] = {}
    for name, path in captures:
        print(f"{name}: standard ...", file=sys.stderr, flush=True)
        standard[name] = run(path, config("standard"))
        for n in expected:
            print(f"{name}: strict x {repeat}, expected_devices {n} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            strict[name, n] = [run(path, config("strict", n)) for _ in range(repeat)]
        took = standard[name].seconds + sum(r.seconds for n in expected for r in strict[name, n])
        print(f"{name}: done in {took:.1f} s", file=sys.stderr, flush=True)

    out = [
        f"## Strict against standard (pipeline output before release; {WINDOW_S // 60}-minute "
        "windows)",
        "",
        f"Over windows where standard counts {MIN_DEVICES} or more devices: MAE in devices, "
        f"MAPE (%) over those where standard's value is {MIN_DEVICES} or more, bias = mean of "
        f"strict - standard. Strict: mean of {repeat} runs (each draws its own keys, so its "
        "collisions differ).",
        "",
        "| capture | expected_devices | id_bits | windows std / strict | compared | mean devices "
        "(std) | devices MAE | MAPE | bias | visitors MAE | MAPE | bias | randomised MAE "
        "| MAPE | bias |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _ in captures:
        std = standard[name]
        mean = sum(w.devices for w in std.windows.values()) / max(len(std.windows), 1)
        for n in expected:
            runs = strict[name, n]
            cells: list[str] = []
            compared = 0
            for metric in METRICS:
                found = against(runs, std, metric)
                if found is None:
                    cells += ["n/a", "n/a", "n/a"]
                    continue
                compared = found.windows
                cells += [_f(found.mae), _f(found.mape, 1), f"{found.bias:+.2f}"]
            out.append(
                f"| {name} | {n} | {runs[0].config.privacy.id_bits} | {len(std.windows)} / "
                f"{len(runs[0].windows)} | {compared} | {mean:.1f} | " + " | ".join(cells) + " |"
            )

    if truth is not None:
        out += [
            "",
            "## Against the lab's ground truth (people in the room; uncalibrated)",
            "",
            "MAE in people over every window the truth covers; MAPE (%) over those with 3 "
            f"people or more. Strict: mean of {repeat} runs.",
            "",
            "| capture | windows | std people_est MAE | MAPE | std visitors MAE | MAPE | "
            + " | ".join(f"strict visitors (expected {n}) MAE | MAPE" for n in expected)
            + " |",
            "|---|---:|" + "---:|" * (4 + 2 * len(expected)),
        ]
        for name, _ in lab:
            std = standard[name]
            est = vs_truth([std], truth, lambda w: float(w.people_est or 0))
            cells = [_mae_mape(est), _mae_mape(vs_truth([std], truth, lambda w: w.visitors))]
            cells += [_mae_mape(vs_truth(strict[name, n], truth, lambda w: w.visitors))
                      for n in expected]  # fmt: skip
            out.append(f"| {name} | {est[2]} | " + " | ".join(cells) + " |")

    out += [
        "",
        f"## Small-count suppression (k = {K}): windows published with a null count",
        "",
        "| capture | windows | standard: visitors null | devices null | "
        + " | ".join(f"strict ({n}): visitors null | devices null" for n in expected)
        + " |",
        "|---|---:|" + "---:|" * (2 + 2 * len(expected)),
    ]
    for name, _ in captures:
        groups = [[standard[name]], *(strict[name, n] for n in expected)]
        cells = [f"{null_share(g, f):.0f} %" for g in groups for f in ("visitors", "devices")]
        out.append(f"| {name} | {len(standard[name].windows)} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
