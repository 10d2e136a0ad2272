"""The aggregator's store, on SQLite and on PostgreSQL alike (``store`` is parametrised)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from aggregator.errors import RegistryError
from aggregator.rollup import MAX_MEASURES, MEASURES, buckets, window_measures
from aggregator.store import (
    MAX_SETTLED_RANGES,
    NULLABLE_COLUMNS,
    SPOOL_FILLING,
    Store,
    agent_days,
    agent_hours,
    agents,
    merge_ranges,
    metadata,
    site_days,
    site_hours,
    windows,
)
from aggregator.verify import Accepted, Verifier
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    counts_payload,
    status_payload,
    utc_text,
)
from tests.support.agent_fleet import fast_seal
from tests.support.aggregator_harness import Agent

NOW = 1_729_999_800  # 2024-10-27T03:30:00Z, on the 5-minute grid


def accept(store: Store, topic: str, data: bytes, at: int = NOW) -> Accepted:
    result = Verifier(65536).check(topic, data, store.registry(), at)
    assert isinstance(result, Accepted), result
    return result


def enrolled(store: Store, *agents_: Agent, zone: str = "Europe/Paris") -> None:
    for site in sorted({a.site for a in agents_}):
        store.add_site(site, f"Shop {site}", zone, NOW)
    for a in agents_:
        store.add_agent(a.site, a.agent, a.public_key, NOW)


def test_migrations_make_exactly_the_tables_the_store_defines(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert store.migrate() == "0011"  # again: nothing to do


def test_sites_and_agents_are_enrolled_revoked_and_refused_with_reasons(store: Store) -> None:
    agent = Agent()
    with pytest.raises(RegistryError, match="site s1 does not exist: add it first"):
        store.add_agent("s1", "a1", agent.public_key, NOW)
    with pytest.raises(RegistryError, match="IANA name such as 'Europe/Paris', got 'Mars/Base'"):
        store.add_site("s1", "", "Mars/Base", NOW)
    with pytest.raises(RegistryError, match=r"site id must match .*, got 'Shop 1'"):
        store.add_site("Shop 1", "", "UTC", NOW)
    store.add_site("s1", "Shop", "Europe/Paris", NOW)
    with pytest.raises(RegistryError, match="site s1 already exists"):
        store.add_site("s1", "Shop", "UTC", NOW)
    with pytest.raises(RegistryError, match="agent s1/a1: public key must be 32 bytes"):
        store.add_agent("s1", "a1", "AAAA", NOW)
    version = store.registry_version()
    store.add_agent("s1", "a1", agent.public_key, NOW)
    assert store.registry_version() == version + 1
    with pytest.raises(RegistryError, match="agent s1/a1 is already enrolled; --replace"):
        store.add_agent("s1", "a1", agent.public_key, NOW)
    entry = store.registry().get("s1", "a1")
    assert entry is not None and not entry.revoked and entry.zone == "Europe/Paris"

    store.revoke_agent("s1", "a1", NOW + 1)
    entry = store.registry().get("s1", "a1")
    assert entry is not None and entry.revoked
    with pytest.raises(RegistryError, match="agent s1/a1 is already revoked"):
        store.revoke_agent("s1", "a1", NOW)
    with pytest.raises(RegistryError, match="agent s1/zz is not enrolled"):
        store.revoke_agent("s1", "zz", NOW)
    replacement = Agent()
    store.add_agent("s1", "a1", replacement.public_key, NOW + 2, replace=True)
    entry = store.registry().get("s1", "a1")
    assert entry is not None and not entry.revoked
    assert [s.agents for s in store.sites()] == [1]


def test_a_window_is_stored_once_whatever_comes_again(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    first = accept(store, agent.topic, agent.counts(10, "2024-03-05T10:55:00Z"))
    outcome = store.store_batch([first, first], now=NOW)
    assert [m.payload["seq"] for m in outcome.stored] == [10]
    assert [reason for _, reason in outcome.skipped] == ["duplicate"]

    again = accept(store, agent.topic, agent.counts(10, "2024-03-05T10:55:00Z"))
    other = agent.counts(10, "2024-03-05T10:55:00Z", probe_requests=12)
    other_counts = accept(store, agent.topic, other)
    same_window = accept(store, agent.topic, agent.counts(11, "2024-03-05T10:55:00Z"))
    outcome = store.store_batch([again, other_counts, same_window], now=NOW)
    assert outcome.stored == []
    assert sorted(reason for _, reason in outcome.skipped) == [
        "duplicate",
        "duplicate_window",
        "seq_conflict",
    ]
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar() == 1
        assert conn.execute(sa.select(site_days.c.windows)).scalar() == 1  # counted once
    assert store.refusal_counts() == {
        ("duplicate", "s1", "a1"): 2,
        ("seq_conflict", "s1", "a1"): 1,
        ("duplicate_window", "s1", "a1"): 1,
    }


def test_every_counts_field_is_kept_and_later_fields_stay_in_the_payload(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    data = agent.counts(1, "2024-03-05T10:55:00Z", people_est=4, static_excluded=1, people=5)
    message = accept(store, agent.topic, data)
    store.store_batch([message], now=NOW)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(windows)).one()._asdict()
    assert row["people_est"] == 4 and row["static_excluded"] == 1 and row["people"] == 5
    assert row["dwell_5_15"] == 5 and row["devices_epoch"] == 289
    assert row["payload"] == message.canonical  # what the signature covers, verbatim
    assert row["sig"] == message.signature


def _payloads(agent: Agent, starts: list[int], first_seq: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(first_seq)
    out = []
    for i, start in enumerate(starts):
        window = {
            "window_start": utc_text(start),
            "window_s": 300,
            "probe_requests": rng.randrange(500),
            "malformed": rng.randrange(3),
            "late_frames": rng.randrange(3),
            "devices": (devices := rng.randrange(40)),
            "devices_randomised": rng.randrange(devices + 1),
            "visitors": (visitors := rng.randrange(devices + 1)),
            "passersby": devices - visitors,
            "dwell_minutes": (
                dwell := {k: rng.randrange(4) for k in ("lt5", "5-15", "15-30", "30-60", "ge60")}
            ),
            "visits_ended": sum(dwell.values()),
            "devices_epoch": 100 + i,
        }
        if rng.random() < 0.5:
            window |= {"people_est": rng.randrange(20), "static_excluded": 1}
            if rng.random() < 0.5:
                window["people"] = rng.randrange(20)
        out.append(
            counts_payload(
                SiteId(agent.site), AgentId(agent.agent), first_seq + i, "0" * 16, window, version=1
            )
        )
    return out


def _recount(
    payloads: list[tuple[int, str, str, dict[str, Any]]],
) -> dict[str, dict[Any, list[int]]]:
    """The roll-ups, counted again from the windows, in plain Python."""
    tables: dict[str, dict[Any, list[int]]] = {
        name: {} for name in ("agent_hours", "agent_days", "site_hours", "site_days")
    }
    for agent_key, site, zone, p in payloads:
        b = buckets(_unix(p["window_start"]), zone)
        sums, maxima = window_measures(p)
        values = sums + maxima
        for name, key in (
            ("agent_hours", (agent_key, b.hour_start)),
            ("agent_days", (agent_key, b.local_day)),
            ("site_hours", (site, b.hour_start)),
            ("site_days", (site, b.local_day)),
        ):
            row = tables[name].setdefault(key, [0] * len(MEASURES))
            for i, m in enumerate(MEASURES):
                row[i] = max(row[i], values[i]) if m in MAX_MEASURES else row[i] + values[i]
    return tables


def _unix(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def _stored_rollups(store: Store) -> dict[str, dict[Any, list[int]]]:
    out: dict[str, dict[Any, list[int]]] = {}
    with store.engine.connect() as conn:
        for table in (agent_hours, agent_days, site_hours, site_days):
            keys = [c.name for c in table.primary_key.columns]
            rows = conn.execute(sa.select(table)).mappings().all()
            out[table.name] = {
                tuple(row[k] for k in keys): [row[m] for m in MEASURES] for row in rows
            }
    return out


def test_rollups_equal_a_recount_of_the_windows_whatever_the_order_of_arrival(
    store: Store,
) -> None:
    paris, kolkata = Agent("s1", "a1"), Agent("s2", "b1")
    paris2 = Agent("s1", "a2")
    store.add_site("s1", "", "Europe/Paris", NOW)
    store.add_site("s2", "", "Asia/Kolkata", NOW)
    for a in (paris, paris2, kolkata):
        store.add_agent(a.site, a.agent, a.public_key, NOW)
    registry = store.registry()
    # Windows around the autumn change in Paris (2024-10-27) and a half-hour zone.
    base = 1_729_980_000  # 2024-10-26T22:00:00Z
    every: list[tuple[Accepted, tuple[int, str, str, dict[str, Any]]]] = []
    verifier = Verifier(65536)
    for agent, zone in (
        (paris, "Europe/Paris"),
        (paris2, "Europe/Paris"),
        (kolkata, "Asia/Kolkata"),
    ):
        starts = [base + 300 * i for i in range(0, 120, 1 if agent is paris else 3)]
        entry = registry.get(agent.site, agent.agent)
        assert entry is not None
        for p in _payloads(agent, starts):
            result = verifier.check(agent.topic, fast_seal(p, agent.key), registry, base + 86400)
            assert isinstance(result, Accepted)
            every.append((result, (entry.key, agent.site, zone, p)))
    rng = random.Random(7)
    arrivals = [m for m, _ in every] + [m for m, _ in rng.sample(every, 30)]  # redeliveries
    rng.shuffle(arrivals)  # late windows: any order
    for i in range(0, len(arrivals), 37):
        store.store_batch(arrivals[i : i + 37], now=NOW)
    assert _stored_rollups(store) == _recount([row for _, row in every])


def test_daylight_saving_days_have_23_and_25_local_hours(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    spring = 1_711_839_600  # 2024-03-30T23:00:00Z, Paris midnight of 2024-03-31
    autumn = 1_729_980_000  # 2024-10-26T22:00:00Z, Paris midnight of 2024-10-27
    starts = [spring + 300 * i for i in range(23 * 12)] + [autumn + 300 * i for i in range(25 * 12)]
    registry = store.registry()
    verifier = Verifier(65536)
    messages = []
    for p in _payloads(agent, starts):
        result = verifier.check(agent.topic, fast_seal(p, agent.key), registry, autumn + 90000)
        assert isinstance(result, Accepted)
        messages.append(result)
    store.store_batch(messages, now=NOW)
    with store.engine.connect() as conn:
        days = conn.execute(
            sa.select(site_days.c.local_day, site_days.c.day_hours, site_days.c.windows).order_by(
                site_days.c.local_day
            )
        ).all()
        hours = conn.execute(
            sa.select(site_hours.c.local_hour, site_hours.c.utc_offset_s, site_hours.c.windows)
            .where(site_hours.c.local_hour.like("2024-10-27T02%"))
            .order_by(site_hours.c.hour_start)
        ).all()
        per_day = conn.execute(
            sa.select(sa.func.count(), sa.func.min(site_hours.c.windows)).where(
                site_hours.c.hour_start >= autumn
            )
        ).one()
    assert [tuple(d) for d in days] == [("2024-03-31", 23, 276), ("2024-10-27", 25, 300)]
    assert [tuple(h) for h in hours] == [
        ("2024-10-27T02:00", 7200, 12),
        ("2024-10-27T02:00", 3600, 12),
    ]
    assert tuple(per_day) == (25, 12)  # 25 full hours on the long day


def test_retention_deletes_old_windows_keeps_rollups_and_refuses_their_replay(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    old = [
        accept(store, agent.topic, agent.counts(i, utc_text(NOW - 100 * 86400 + 300 * i)))
        for i in (1, 2)
    ]
    new = accept(store, agent.topic, agent.counts(3, utc_text(NOW - 86400)))
    store.store_batch([*old, new], now=NOW)
    before = _stored_rollups(store)
    assert store.prune(NOW, 0) == 0  # 0 keeps everything
    assert store.prune(NOW, 90) == 2
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(windows.c.seq)).scalars().all() == [3]
    assert _stored_rollups(store) == before
    replay = Verifier(65536).check(
        agent.topic, agent.counts(2, utc_text(NOW - 100 * 86400 + 600)), store.registry(), NOW
    )
    assert not isinstance(replay, Accepted)
    assert replay.reason == "expired"


def test_agent_health_shows_status_last_seen_and_missing_windows(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    t0 = NOW - NOW % 300
    seqs = {1: 0, 2: 1, 5: 4, 6: 5, 1_800_000_000: 7}  # 3, 4 lost; then a new spool (seq jump)
    messages = [
        accept(store, agent.topic, agent.counts(seq, utc_text(t0 + 300 * i)))
        for seq, i in seqs.items()
    ]
    status = status_payload(
        SiteId("s1"),
        AgentId("a1"),
        cause="connected",
        at=NOW + 5,
        spool_pending=0,
        spool_dropped=2,
        last_seq=6,
    )
    messages.append(
        accept(store, "footfall/v1/s1/a1/status", fast_seal(status, agent.key), NOW + 9)
    )
    store.store_batch(messages, now=NOW)
    (health,) = store.agents()
    assert (health.state, health.cause, health.spool_dropped) == ("online", "connected", 2)
    assert health.last_seen_at == NOW + 9
    assert (health.windows, health.last_seq, health.missing) == (5, 1_800_000_000, 3)
    gaps = store.gaps("s1", "a1")
    assert [(g.after_seq, g.before_seq, g.missing) for g in gaps] == [
        (6, 1_800_000_000, 1),  # a new spool: bounded by the time between the windows
        (2, 5, 2),
    ]
    older = status_payload(
        SiteId("s1"),
        AgentId("a1"),
        cause="lost",
        at=NOW,
        spool_pending=0,
        spool_dropped=0,
        last_seq=0,
    )
    store.store_batch(
        [accept(store, "footfall/v1/s1/a1/status", fast_seal(older, agent.key))], now=NOW
    )
    assert store.agents()[0].state == "online"  # an older status (a retained one) changes nothing
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(agents.c.status_at)).scalar() == NOW + 5


def test_health_shows_a_v2_status_eviction_rounds_and_a_v1_status_none(store: Store) -> None:
    """Status v2's eviction rounds land in the agent's health (and ``agents list``); a later
    status v1 (an agent rolled back) says nothing of them: unknown, not zero."""
    agent = Agent()
    enrolled(store, agent)
    assert (store.agents()[0].count_evictions, store.agents()[0].estimate_evictions) == (
        None,
        None,
    )
    for at, version, evictions in ((NOW, 2, (3, 8)), (NOW + 60, 1, (0, 0))):
        status = status_payload(
            SiteId("s1"), AgentId("a1"), cause="connected", at=at, spool_pending=0,
            spool_dropped=0, last_seq=0, evictions=evictions, version=version,
        )  # fmt: skip
        topic = "footfall/v1/s1/a1/status"
        store.store_batch([accept(store, topic, fast_seal(status, agent.key), at)], now=at)
        (health,) = store.agents()
        seen = (health.count_evictions, health.estimate_evictions)
        assert seen == (evictions if version == 2 else (None, None))


def test_refusals_are_counted_by_reason_site_and_agent(store: Store) -> None:
    store.store_batch([], {("bad_signature", "s1", "a1"): 2, ("bad_topic", "", ""): 1}, now=NOW)
    store.store_batch([], {("bad_signature", "s1", "a1"): 3}, now=NOW + 1)
    assert store.refusal_counts() == {("bad_signature", "s1", "a1"): 5, ("bad_topic", "", ""): 1}


def test_many_agents_are_enrolled_in_one_go(store: Store) -> None:
    store.add_site("s1", "", "UTC", NOW)
    fleet = [Agent("s1", f"a{i}") for i in range(20)]
    store.add_agents("s1", {a.agent: a.public_key for a in fleet}, NOW)
    assert len(store.registry().agents) == 20
    with pytest.raises(RegistryError, match="cannot enrol 1 agents of site s1"):
        store.add_agents("s1", {"a0": fleet[0].public_key}, NOW)


def test_rollup_rows_sum_like_the_windows_they_hold(store: Store) -> None:
    """The per-agent day equals the sum of its hours (a spot check of the upserts' algebra)."""
    agent = Agent()
    enrolled(store, agent)
    t0 = 1_709_596_800  # 2024-03-05T00:00:00Z
    messages = [
        accept(store, agent.topic, agent.counts(i + 1, utc_text(t0 + 900 * i))) for i in range(8)
    ]
    store.store_batch(messages, now=NOW)
    sums: defaultdict[str, int] = defaultdict(int)
    with store.engine.connect() as conn:
        for row in conn.execute(sa.select(agent_hours)).mappings():
            for m in MEASURES:
                sums[m] = max(sums[m], row[m]) if m in MAX_MEASURES else sums[m] + row[m]
        day = conn.execute(sa.select(agent_days)).mappings().one()
    assert {m: day[m] for m in MEASURES} == dict(sums)
    assert day["windows"] == 8 and day["probe_requests"] == 8 * 96


def test_suppressed_counts_are_null_and_known_as_suppressed_absent_ones_as_absent(
    store: Store,
) -> None:
    """A null count (suppressed below k) is stored as NULL with its bit set; a field a strict
    agent leaves out is NULL without it. Roll-ups sum only what was published and count, per
    measure, the suppressed windows and the windows that carried an optional field."""
    agent = Agent()
    enrolled(store, agent)
    t0 = 1_709_596_800  # 2024-03-05T00:00:00Z, 01:00 in Paris
    standard = accept(
        store,
        agent.topic,
        agent.counts(
            1,
            utc_text(t0),
            visitors=None,
            dwell_minutes={"lt5": None, "5-15": 5, "15-30": None, "30-60": 0, "ge60": 6},
        ),
    )
    strict_window = {
        "window_start": utc_text(t0 + 300),
        "window_s": 300,
        "probe_requests": 40,
        "malformed": 0,
        "late_frames": 0,
        "devices": 7,
        "devices_randomised": None,
        "visitors": 5,
        "passersby": None,
    }
    strict = accept(
        store,
        agent.topic,
        fast_seal(
            counts_payload(SiteId("s1"), AgentId("a1"), 2, "0" * 16, strict_window, version=1),
            agent.key,
        ),
    )
    store.store_batch([standard, strict], now=NOW)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(windows).order_by(windows.c.seq)).mappings().all()
        day = conn.execute(sa.select(site_days)).mappings().one()
    assert (rows[0]["visitors"], rows[0]["dwell_lt5"], rows[0]["dwell_5_15"]) == (None, None, 5)
    assert (rows[1]["visits_ended"], rows[1]["dwell_lt5"], rows[1]["devices_randomised"]) == (
        None,
        None,
        None,
    )
    suppressed = [
        {name for bit, name in enumerate(NULLABLE_COLUMNS) if row["suppressed"] >> bit & 1}
        for row in rows
    ]
    assert suppressed == [
        {"visitors", "dwell_lt5", "dwell_15_30"},
        {"devices_randomised", "passersby"},
    ]
    assert day["windows"] == 2
    assert (day["visitors_sum"], day["visitors_suppressed"], day["visitors_max"]) == (5, 1, 5)
    assert (day["devices_sum"], day["devices_suppressed"]) == (18, 0)
    assert (day["passersby_sum"], day["passersby_suppressed"]) == (3, 1)
    assert (day["visits_ended"], day["visits_ended_windows"], day["visits_ended_suppressed"]) == (
        18,
        1,
        0,
    )
    assert (day["dwell_windows"], day["dwell_lt5"], day["dwell_lt5_suppressed"]) == (1, 0, 1)
    assert (day["dwell_5_15"], day["dwell_15_30_suppressed"], day["dwell_ge60"]) == (5, 1, 6)
    assert (day["devices_epoch_windows"], day["devices_epoch_max"]) == (1, 289)
    assert day["people_est_windows"] == 0


def _key(store: Store, agent: str = "a1") -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(sa.select(agents.c.agent_key).where(agents.c.agent_id == agent)).scalar()
        )


def test_settled_ranges_hold_what_is_stored_or_skipped_for_good(store: Store) -> None:
    agent = Agent()
    enrolled(store, agent)
    t0 = NOW - NOW % 300

    def batch(*seqs: int, shift: int = 0) -> list[Accepted]:
        return [
            accept(store, agent.topic, agent.counts(s, utc_text(t0 + 300 * (s + shift))))
            for s in seqs
        ]

    key = _key(store)
    assert store.store_batch(batch(1, 2, 3, 7), now=NOW).settled == {key}
    assert store.settled([key]) == {key: ("s1", "a1", [(1, 3), (7, 7)])}
    store.store_batch(batch(2, 5), now=NOW)  # 2 again: a duplicate, settled already
    store.store_batch(batch(6, shift=-5), now=NOW)  # the window of seq 1 under seq 6: skipped
    assert store.settled([key])[key][2] == [(1, 3), (5, 7)]
    store.store_batch(batch(4), now=NOW)
    assert store.settled([key])[key][2] == [(1, 7)]
    assert store.settled([key + 1]) == {}


def test_settled_ranges_merge_and_keep_the_highest_when_there_are_too_many() -> None:
    assert merge_ranges([[1, 3], [7, 9]], [4, 5, 11, 6, 2]) == [[1, 9], [11, 11]]
    assert merge_ranges([], []) == []
    many = merge_ranges([], range(1, 2 * MAX_SETTLED_RANGES + 100, 2))
    assert len(many) == MAX_SETTLED_RANGES + 50


def test_health_counts_the_windows_after_the_last_stored_and_says_a_spool_is_filling(
    store: Store,
) -> None:
    agent = Agent()
    enrolled(store, agent)
    t0 = NOW - NOW % 300
    messages = [
        accept(store, agent.topic, agent.counts(s, utc_text(t0 + 300 * s))) for s in (1, 2, 4)
    ]
    status = status_payload(
        SiteId("s1"), AgentId("a1"), cause="connected", at=NOW, spool_pending=SPOOL_FILLING + 1,
        spool_dropped=0, last_seq=10,
    )  # fmt: skip
    messages.append(accept(store, "footfall/v1/s1/a1/status", fast_seal(status, agent.key)))
    store.store_batch(messages, now=NOW)
    (health,) = store.agents()
    assert (health.windows, health.missing, health.spool_filling) == (3, 1 + 6, True)
    (bounded,) = store.agents(since=0, until=NOW + 86400)  # a past day: gaps only
    assert bounded.missing == 1
    # Seq 3 (in the gap), 6 (after the last stored) and 0 (before the first: never counted
    # as missing anyway) refused for their content after they verified: settled, not missing.
    key = _key(store)
    row = {"received_at": NOW, "reason": "inconsistent", "site_id": "s1", "agent_id": "a1",
           "topic": agent.topic, "error": "counts: ...", "size": 1, "digest": "0" * 64}  # fmt: skip
    settle = [(key, 3), (key, 6), (key, 0)]
    assert store.quarantine([row] * 3, NOW, settle=settle) == {key}
    assert store.settled([key])[key][2] == [(0, 4), (6, 6)]
    assert store.refusal_counts()[("inconsistent", "s1", "a1")] == 3
    (health,) = store.agents()
    assert (health.windows, health.missing, health.refused) == (3, 1 + 6 - 2, 3)
    (bounded,) = store.agents(since=0, until=NOW + 86400)
    assert (bounded.missing, bounded.refused) == (0, 3)


def test_health_reads_the_gaps_of_only_the_agents_with_a_seq_missing_and_counts_the_same(
    store: Store,
) -> None:
    """An agent whose stored seqs run without a hole (in the range asked) has no gap, so its
    windows are not read one by one; the others' gaps are counted as before, in that range."""
    steady, lossy, reset = Agent(agent="a1"), Agent(agent="a2"), Agent(agent="a3")
    enrolled(store, steady, lossy, reset)
    t0 = NOW - NOW % 300
    runs = {
        steady: {s: s for s in range(1, 13)},
        lossy: {1: 1, 2: 2, 5: 5, 6: 6, 9: 9, 12: 12},  # 3-4, 7-8, 10-11 lost
        reset: {1: 1, 2: 2, 1_800_000_000: 4},  # a new spool, one window of time between
    }
    messages = [
        accept(store, agent.topic, agent.counts(seq, utc_text(t0 + 300 * i)))
        for agent, seqs in runs.items()
        for seq, i in seqs.items()
    ]
    store.store_batch(messages, now=NOW)
    whole = {h.agent: (h.windows, h.missing) for h in store.agents("s1")}
    assert whole == {"a1": (12, 0), "a2": (6, 6), "a3": (3, 1)}
    assert [sum(g.missing for g in store.gaps("s1", a)) for a in ("a1", "a2", "a3")] == [0, 6, 1]
    # Windows 5..8 only: lossy's 5, 6 stored; its gap to 9 is outside, the steady one runs.
    part = store.agents("s1", since=t0 + 300 * 5, until=t0 + 300 * 9)
    assert {h.agent: (h.windows, h.missing) for h in part} == {
        "a1": (4, 0),
        "a2": (2, 0),
        "a3": (0, 0),
    }
    part = store.agents("s1", since=t0 + 300 * 2, until=t0 + 300 * 10)
    assert {h.agent: (h.windows, h.missing) for h in part} == {
        "a1": (8, 0),
        "a2": (4, 4),  # 2, 5, 6, 9: 3-4 and 7-8
        "a3": (2, 1),  # 2, then the new spool's window at 4
    }
