"""Property-based checks of the live API against its own OpenAPI document (schemathesis).

Every generated request, valid or not, must get a documented status with a body matching the
documented schema, and never a 5xx. CI runs a bounded number of examples per operation;
`./dev test --deep` runs many more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import URL

from app.openapi import render_document
from tests.conftest import ADMIN_TOKEN, LiveServer, clone_database, drop_database, make_settings, serve_app
from tests.factories import auth

pytestmark = pytest.mark.slow

schema = schemathesis.openapi.from_dict(render_document())
EXAMPLES = int(os.environ.get("COHORT_SCHEMATHESIS_EXAMPLES", "8"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_server(template_db: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import httpx

    url = clone_database(template_db)
    settings_ = make_settings(url, Path(tmp_path_factory.mktemp("schemathesis")), rate_limit_per_minute=0)
    try:
        with serve_app(settings_, url) as server:
            with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as client:
                client.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                     "template": "pal-replication"})
            yield server
    finally:
        drop_database(url)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_the_api_honours_its_schema(case: schemathesis.Case[Any], api_server: LiveServer) -> None:
    case.call_and_validate(base_url=api_server.url, headers=auth(ADMIN_TOKEN), checks=CHECKS)
