"""openapi.json describes exactly the routes the broker's app serves, and is a
structurally valid OpenAPI 3.0 document (every $ref resolves, path parameters are
declared, responses are keyed by status code)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route

from portagent.broker.fleet import api
from portagent.broker.fleet.keyring import KeyRing, generate_key
from portagent.broker.fleet.store import FleetStore

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
SECURITY_TYPES_3_0 = {"apiKey", "http", "oauth2", "openIdConnect"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    value = json.loads(api.OPENAPI_PATH.read_text())
    assert isinstance(value, dict)
    return value


@pytest.fixture
def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    store = FleetStore.open(f"sqlite:///{tmp_path / 'b.db'}", replica="t")
    generate_key(tmp_path / "keys", now=0.0)
    keyring = KeyRing.load(tmp_path / "keys")
    ctx = api.ApiContext(
        store=store,
        keyring=lambda: keyring,
        tokens=lambda: api.Tokens({}),
        publish=lambda host_id: None,
        log=lambda *a, **k: None,
    )
    try:
        app = api.build_app(ctx)
        found = set()
        for route in app.routes:
            assert isinstance(route, Route)
            for method in route.methods or ():
                if method != "HEAD":  # Starlette adds HEAD to every GET
                    found.add((route.path, method.lower()))
        return found
    finally:
        ctx.close()
        store.close()


def test_openapi_names_exactly_the_apps_routes(
    spec: dict[str, Any], app_routes: set[tuple[str, str]]
) -> None:
    described = {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }
    assert described == app_routes


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_is_a_valid_3_0_document(spec: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.0\.\d+", spec["openapi"])
    assert spec["info"]["title"] and spec["info"]["version"]
    for ref in _refs(spec):
        _resolve(spec, ref)
    schemes = spec["components"]["securitySchemes"]
    assert all(s["type"] in SECURITY_TYPES_3_0 for s in schemes.values())
    for requirement in spec.get("security", []):
        assert set(requirement) <= set(schemes)
    operation_ids = []
    for path, item in spec["paths"].items():
        assert path.startswith("/v1/")
        templated = set(re.findall(r"{([^}]+)}", path))
        for method, operation in item.items():
            assert method in METHODS, f"{path}: {method}"
            operation_ids.append(operation["operationId"])
            params = operation.get("parameters", [])
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == templated, f"{method} {path}: path parameters"
            for param in params:
                assert param["in"] in {"path", "query", "header", "cookie"}
                assert "schema" in param
                if param["in"] == "path":
                    assert param["required"] is True
            assert operation["responses"], f"{method} {path}: no responses"
            for code, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d|default", code), code
                assert response["description"]
            if "requestBody" in operation:
                assert "application/json" in operation["requestBody"]["content"]
    assert len(operation_ids) == len(set(operation_ids))


def test_every_error_status_the_api_maps_to_is_json(spec: dict[str, Any]) -> None:
    # The canonical code -> HTTP status table the handlers use covers every code the
    # store raises, and every 4xx the document lists uses the one error body.
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"):
        assert code in api.HTTP_STATUS
    for item in spec["paths"].values():
        for operation in item.values():
            for code, response in operation["responses"].items():
                if code.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::7", "2001:db8::7/128"),
        ("::ffff:192.0.2.7", "192.0.2.7/32"),  # a dual-stack listener's IPv4 caller
    ],
)
def test_the_requesters_own_address_is_the_default_source(client: str, expected: str) -> None:
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "client": (client, 1)}
    assert api.requester_network(Request(scope)) == expected


def test_no_client_address_asks_for_explicit_sources() -> None:
    from starlette.requests import Request

    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [],
        "client": None,
    }
    with pytest.raises(api.ApiError) as caught:
        api.requester_network(Request(scope))
    assert caught.value.field == "sources" and caught.value.reason == "NO_CLIENT_ADDRESS"
