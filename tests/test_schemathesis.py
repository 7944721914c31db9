"""Schemathesis against the server's own /openapi.json, in process (WSGI) with the real tiny models.

Every documented operation gets generated requests (valid and invalid); whatever is sent, the answer
is not a 5xx, its status is one the document lists, and a documented JSON body matches its schema.
"""

from __future__ import annotations

import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def test_every_documented_operation_answers_as_documented(app):
    """Schemathesis' own pytest integration (`from_fixture`) does not run under pytest 9, so each operation
    of the document gets its hypothesis run here, with schemathesis generating and checking the cases."""
    # The document is read from the running app, not from a file: what clients see is what is tested.
    assert app.test_client().get("/openapi.json").status_code == 200, \
        "GET /openapi.json is missing: this test expects the document generated from the schemas"
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/embeddings", "POST /v1/rerank", "POST /v2/rerank"} <= labels, labels
    failures = []
    for operation in operations:
        # Valid cases for every operation; invalid ones (wrong types, missing fields) where there is a body.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(checks=CHECKS)

            try:
                run()
            except Exception as exc:  # collect every operation's first failure, then report them all
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
