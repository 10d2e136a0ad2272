"""The aggregator names its columns, API rows and CSV headers from the contract's catalogue
(:mod:`firmware_agent.contract.fields`): roll-ups, people figures and the API's people rows."""

from __future__ import annotations

from aggregator import api, people, rollup
from firmware_agent.contract import fields


def test_roll_up_columns_follow_the_catalogue() -> None:
    assert [band for band, _ in rollup.DWELL_BANDS] == list(fields.DWELL_BANDS)
    v1 = [fields.column(name) for name in fields.COUNTS_V1.counts]
    assert list(rollup.SUPPRESSIBLE) == [name for name in v1 if name != "static_excluded"]
    assert [name for name, _ in rollup.PEOPLE_FIELDS] == list(fields.PEOPLE_COUNTS)
    assert rollup.PEOPLE_COLUMNS[-1] == "occupancy_peak"


def test_the_api_people_row_holds_every_catalogue_figure() -> None:
    """``PeopleRow`` stays a written-out pydantic model (mypy and the OpenAPI schema read it
    as a class); its figures are held here to the catalogue's."""
    figures = [fields.column(name) for name in fields.PEOPLE_COUNTS] + list(fields.LEVELS)
    assert list(people.FIGURES) == figures
    row = [n for n in api.PeopleRow.model_fields if n not in ("local", "no_data")]
    assert row[3:] == [n for f in figures for n in (f, f"{f}_suppressed")]
