"""The demo's shop as the agent hears it: ``shop_traffic``'s days of phones, one pcap stream,
through the agent's pipeline with the demo shops' settings (hourly windows, the site's
threshold, the shop's time zone): the printer and TV next door keep its nights zeros, not gaps; its
outage is no data; and its days' visitors are counted within 10 % of the generator's truth."""

from __future__ import annotations

import io
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from firmware_agent.settings import load_config
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.shop_traffic import ShopProfile, shop_specs
from firmware_agent.tools.synthetic import write_people_stream

ZONE = "Europe/Paris"
SHOP = {
    "FOOTFALL_COUNT_WINDOW_S": "3600",
    "FOOTFALL_ESTIMATE_RSSI_THRESHOLD_DBM": "-76",
    "FOOTFALL_EPOCH_TIMEZONE": ZONE,
}


def test_a_shops_days_stream_through_the_agent_as_the_shop_was() -> None:
    first = date(2026, 11, 2)  # a Monday and a Tuesday
    tz = ZoneInfo(ZONE)
    outage = int(datetime.combine(date(2026, 11, 3), time(14), tz).timestamp())
    profile = ShopProfile(peak_arrivals_per_hour=40, seed=7, no_data=(outage, outage + 3 * 3600))
    specs = shop_specs(profile, first, 2)
    assert shop_specs(profile, first + timedelta(days=1), 1) == specs[1:]  # a date's people
    stream = io.BytesIO()
    truths = write_people_stream(stream, specs)
    stream.seek(0)
    with CaptureReader(stream) as reader:
        windows = list(Pipeline(load_config(None, environ=SHOP)).run(reader))
    start = int(datetime.combine(first, time(0), tz).timestamp())
    assert [w.window_start for w in windows] == list(range(start, start + 48 * 3600, 3600))
    gaps = [w.window_start for w in windows if w.no_data]
    assert gaps == [outage, outage + 3600, outage + 7200]
    for w in windows:
        local = datetime.fromtimestamp(w.window_start, tz)
        if local.hour < 7:  # closed: the devices next door are heard, nobody is in
            assert w.frames > 0 and w.figures is not None
            assert w.figures.arrivals == 0 and w.figures.occupancy_peak == 0
    for day, truth in enumerate(truths):
        hours = range(start + day * 86400, start + (day + 1) * 86400, 3600)
        counted = sum(
            w.figures.arrivals
            for w in windows
            if w.window_start in hours and w.figures is not None and not w.no_data
        )
        want = sum(int(str(h["arrivals"])) for h in truth.hourly())
        lost = sum(
            int(str(h["arrivals"])) for h in truth.hourly() if int(str(h["hour_start"])) in gaps
        )
        assert want > 150 and abs(counted - (want - lost)) <= 0.1 * (want - lost), day


def test_a_demo_started_in_the_first_hour_of_its_only_day_streams_no_frame() -> None:
    first = date(2026, 11, 2)
    until = int(datetime.combine(first, time(0, 20), ZoneInfo(ZONE)).timestamp())
    assert shop_specs(ShopProfile(), first, 1, until) == []
    stream = io.BytesIO()
    assert write_people_stream(stream, []) == []
    stream.seek(0)
    with CaptureReader(stream) as reader:
        assert sum(len(batch) for batch in reader) == 0
