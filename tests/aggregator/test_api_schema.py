"""Schemathesis against the API's own OpenAPI document, every operation (the admin calls too),
as users of every role (API tokens: an admin, a merchant, an installer) on a seeded store (two
shops, four weeks of windows; SQLite, then PostgreSQL): no answer is a server error, and every
status code, content type, header and body is one the document declares."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aggregator.accounts import Accounts
from aggregator.admin import admin_router
from aggregator.api import api_router
from aggregator.app import create_app
from aggregator.store import Store
from tests.support.web_harness import SITES, USERS, seeded_store

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """A seeded store of its own (the run enrols agents, revokes tokens)."""
    with seeded_store(request.param, tmp_path_factory) as store:
        yield store


OPERATIONS = sorted(
    (method, route.path)
    for route in (*api_router.routes, *admin_router.routes)
    if isinstance(route, APIRoute)
    for method in route.methods or ()
)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_answers_as_its_openapi_document_says(
    seeded: Store, method: str, path: str
) -> None:
    store = seeded
    accounts = Accounts(store)
    users = {name: accounts.user(name) for name in USERS}
    operation = schemathesis.openapi.from_asgi("/api/v1/openapi.json", create_app(store))[path][
        method
    ]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases, user=st.sampled_from(sorted(USERS)), site=st.sampled_from([*SITES, None]))
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case[Any], user: str, site: str | None) -> None:
        if site is not None and "site_id" in (case.path_parameters or {}):
            case.path_parameters = {**(case.path_parameters or {}), "site_id": site}
        # A token per example: an admin's example may revoke tokens by id.
        token = accounts.add_token(users[user], "schemathesis", int(time.time()))
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    run()
