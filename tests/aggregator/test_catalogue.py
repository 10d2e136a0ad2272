"""The aggregator takes the contract's catalogue (:mod:`firmware_agent.contract.fields`) for
its roll-up columns, people figures and API rows, and the contract's broker base for its
broker settings."""

from __future__ import annotations

import pytest

from aggregator import api, people, rollup
from aggregator.config import BrokerSettings
from aggregator.errors import ConfigError
from firmware_agent.contract import fields


def test_roll_up_columns_follow_the_catalogue() -> None:
    assert [band for band, _ in rollup.DWELL_BANDS] == list(fields.DWELL_BANDS)
    v1 = [fields.column(name) for name in fields.COUNTS_V1.counts]
    assert list(rollup.SUPPRESSIBLE) == [name for name in v1 if name != "static_excluded"]
    assert [name for name, _ in rollup.PEOPLE_FIELDS] == list(fields.PEOPLE_COUNTS)
    assert rollup.PEOPLE_COLUMNS[-1] == "occupancy_peak"


def test_the_api_people_row_holds_every_catalogue_figure() -> None:
    """``PeopleRow`` stays a written-out pydantic model (mypy and the OpenAPI schema read it
    as a class); its figures are held here to the catalogue's, then the one ratio derived
    from two of them (the capture rate, over the windows that published both)."""
    figures = [fields.column(name) for name in fields.PEOPLE_COUNTS] + list(fields.LEVELS)
    assert list(people.FIGURES) == figures
    row = [n for n in api.PeopleRow.model_fields if n not in ("local", "no_data")]
    assert row[3:] == [n for f in figures for n in (f, f"{f}_suppressed")] + ["capture_rate"]


def test_ingest_broker_settings_raise_the_aggregator_s_own_error() -> None:
    """Ingest extends the contract's broker base with its own defaults and checks, and its
    errors are the aggregator's (the command line turns those into one line)."""
    settings = BrokerSettings()
    assert (settings.username, settings.keepalive_s, settings.backoff_max_s) == (
        "aggregator",
        30,
        30,
    )
    with pytest.raises(ConfigError, match=r"broker\.port must be .* broker\.kind must be"):
        BrokerSettings(port=0, kind="kafka")
