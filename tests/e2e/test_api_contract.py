"""The API's promises at its edge: authentication, roles, problem+json, paging, audit."""

from __future__ import annotations

from typing import Any

import httpx

from e2e.conftest import ADMIN
from e2e.gateway import Gateway

PROBLEM = "application/problem+json"


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:fleetgate:problem:")
    return body


def _token(api: httpx.Client, role: str, groups: list[str] | None = None) -> str:
    created = api.post("/v1/tokens", json={"name": role, "role": role, "groups": groups or []})
    assert created.status_code == 201, created.text
    secret: str = created.json()["secret"]
    return secret


def test_missing_and_wrong_tokens_get_401(gateway: Gateway) -> None:
    with gateway.client(None) as anonymous:
        body = _problem(anonymous.get("/v1/devices"), 401)
        assert anonymous.get("/v1/devices").headers["www-authenticate"].startswith("Bearer")
        assert body["type"].endswith(":unauthenticated")
    with gateway.client("not-a-token") as wrong:
        _problem(wrong.get("/v1/devices"), 401)
        _problem(wrong.post("/v1/devices", json={"id": "x"}), 401)


def test_viewer_cannot_write_and_operator_cannot_administer(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as admin:
        viewer = _token(admin, "viewer")
        operator = _token(admin, "operator")
    with gateway.client(viewer) as api:
        assert api.get("/v1/devices").status_code == 200
        body = _problem(api.post("/v1/devices", json={"id": "d1"}), 403)
        assert "viewer" in body["detail"]
    with gateway.client(operator) as api:
        assert api.post("/v1/devices", json={"id": "d1"}).status_code == 201
        _problem(api.post("/v1/groups", json={"name": "g"}), 403)
        _problem(api.post("/v1/tokens", json={"name": "x", "role": "viewer"}), 403)


def test_group_scoped_token_sees_only_its_groups(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as admin:
        for name in ("north", "south"):
            assert admin.post("/v1/groups", json={"name": name}).status_code == 201
        for device, group in (("n1", "north"), ("s1", "south")):
            assert admin.post("/v1/devices", json={"id": device, "group": group}).status_code == 201
        scoped = _token(admin, "operator", ["north"])
    with gateway.client(scoped) as api:
        assert [d["id"] for d in api.get("/v1/devices").json()["items"]] == ["n1"]
        _problem(api.get("/v1/devices/s1"), 404)  # not even its existence leaks
        _problem(api.post("/v1/devices", json={"id": "s2", "group": "south"}), 403)
        assert api.post("/v1/devices", json={"id": "n2", "group": "north"}).status_code == 201
        audit = api.get("/v1/audit").json()["items"]
        assert audit
        assert all(e["group"] == "north" for e in audit)


def test_malformed_json_and_unknown_fields_are_named(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        body = _problem(
            api.post(
                "/v1/devices", content=b'{"id": "x",', headers={"content-type": "application/json"}
            ),
            400,
        )
        assert body["type"].endswith(":malformed-body")
        body = _problem(api.post("/v1/devices", json={"id": "x", "colour": "red"}), 422)
        assert body["errors"] == [{"field": "colour", "message": "unknown field"}]
        assert "colour" in body["detail"]
        body = _problem(api.post("/v1/devices", json={"id": "x", "addresses": ["nope"]}), 422)
        assert body["errors"][0]["field"] == "addresses"
        body = _problem(api.get("/v1/devices", params={"colour": "red"}), 422)
        assert body["errors"][0]["field"] == "query.colour"
        body = _problem(api.patch("/v1/devices/x", json={"status": "sleeping"}), 422)
        assert body["errors"][0]["field"] == "status"


def test_conflicts_not_found_and_preconditions(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        created = api.post("/v1/devices", json={"id": "a", "addresses": ["10.9.9.9"]})
        assert created.status_code == 201
        assert created.headers["etag"] == '"1"'
        body = _problem(api.post("/v1/devices", json={"id": "b", "addresses": ["10.9.9.9"]}), 409)
        assert "already identifies device a" in body["detail"]
        _problem(api.post("/v1/devices", json={"id": "a"}), 409)
        _problem(api.get("/v1/devices/missing"), 404)
        _problem(api.patch("/v1/devices/a", json={"name": "A"}, headers={"If-Match": '"7"'}), 412)
        updated = api.patch("/v1/devices/a", json={"name": "A"}, headers={"If-Match": '"1"'})
        assert updated.status_code == 200
        assert updated.json()["revision"] == 2
        # A failed write leaves no trace in the audit log.
        actions = [e["action"] for e in api.get("/v1/audit").json()["items"]]
        assert actions[:2] == ["device.update", "device.create"]


def test_pagination_and_attribute_filters(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        for n in range(7):
            model = "m2" if n % 2 else "m1"
            device = {"id": f"dev-{n}", "attributes": {"model": model, "imsi": f"44010000000{n}"}}
            assert api.post("/v1/devices", json=device).status_code == 201
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            page = api.get("/v1/devices", params=params).json()
            seen.extend(d["id"] for d in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"dev-{n}" for n in range(7)]
        m2 = api.get("/v1/devices", params={"attr.model": "m2"}).json()["items"]
        assert [d["id"] for d in m2] == ["dev-1", "dev-3", "dev-5"]
        one = api.get("/v1/devices", params={"attr.imsi": "440100000004"}).json()["items"]
        assert [d["id"] for d in one] == ["dev-4"]


def test_audit_records_before_and_after_without_secrets(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        api.post("/v1/devices", json={"id": "c", "attributes": {"serial": "S1"}})
        api.patch("/v1/devices/c", json={"status": "disabled"})
        secret = _token(api, "viewer")
        entries = api.get("/v1/audit", params={"target_type": "device"}).json()["items"]
        update = entries[0]
        assert update["action"] == "device.update"
        assert update["before"]["status"] == "enabled"
        assert update["after"]["status"] == "disabled"
        assert update["request_id"]
        everything = api.get("/v1/audit", params={"limit": "500"}).text
        assert secret not in everything
        assert ADMIN not in everything


def test_request_id_is_echoed_and_bodies_are_capped(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        response = api.get("/v1/devices", headers={"X-Request-Id": "trace-123"})
        assert response.headers["x-request-id"] == "trace-123"
        huge = {"id": "big", "name": "x" * 2_000_000}
        body = _problem(api.post("/v1/devices", json=huge), 413)
        assert "limited" in body["detail"]
        assert api.get("/healthz").status_code == 200


def test_metrics_openapi_and_docs(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        api.post("/v1/devices", json={"id": "m"})
        api.post("/v1/devices", json={"id": "n", "status": "disabled"})
    with gateway.client(None) as anonymous:
        metrics = anonymous.get("/metrics").text
        assert 'fleetgate_devices{status="enabled"} 1.0' in metrics
        assert 'fleetgate_devices{status="disabled"} 1.0' in metrics
        assert "fleetgate_http_requests_total" in metrics
        for invented in ("Q7F3K9Z", "BREW"):  # any token is a method to the HTTP parser
            assert anonymous.request(invented, "/healthz").status_code in (404, 405)
        metrics = anonymous.get("/metrics").text
        assert 'method="other"' in metrics
        assert "Q7F3K9Z" not in metrics
        assert "BREW" not in metrics
        spec = anonymous.get("/openapi.json").json()
        assert {"/v1/devices", "/v1/groups", "/v1/tokens", "/v1/audit"} <= set(spec["paths"])
        docs = anonymous.get("/docs").text
        assert "/docs/static/swagger-ui-bundle.js" in docs
        assert anonymous.get("/docs/static/swagger-ui-bundle.js").status_code == 200
