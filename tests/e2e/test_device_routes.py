"""Device routes and group settings.routes through the real process: API, OpenAPI and CLI."""

from __future__ import annotations

import json
from typing import Any

import httpx

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, run_cli

PROBLEM = "application/problem+json"


def _invalid(response: httpx.Response) -> list[str]:
    """The fields a 422 problem names."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == "urn:fleetgate:problem:invalid-request"
    return [e["field"] for e in body["errors"]]


def test_api_create_get_patch_and_list_carry_routes(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        created = api.post(
            "/v1/devices", json={"id": "plc-1", "routes": {"mqtt": "aws-iot", "http": "api"}}
        )
        assert created.status_code == 201, created.text
        assert created.json()["routes"] == {"http": "api", "mqtt": "aws-iot"}
        assert created.headers["etag"] == '"1"'

        fetched = api.get("/v1/devices/plc-1")
        assert fetched.json()["routes"] == {"http": "api", "mqtt": "aws-iot"}

        # Merge patch: one route changed, one removed, one added, the rest kept.
        patched = api.patch(
            "/v1/devices/plc-1",
            json={"routes": {"mqtt": "local-broker", "http": None, "udp": "ingest"}},
            headers={"If-Match": '"1"'},
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["routes"] == {"mqtt": "local-broker", "udp": "ingest"}
        assert patched.headers["etag"] == '"2"'

        untouched = api.patch("/v1/devices/plc-1", json={"name": "PLC one"})
        assert untouched.json()["routes"] == {"mqtt": "local-broker", "udp": "ingest"}
        unchanged = api.patch("/v1/devices/plc-1", json={"routes": None})
        assert unchanged.json()["routes"] == {"mqtt": "local-broker", "udp": "ingest"}
        assert unchanged.json()["revision"] == 3

        plain = api.post("/v1/devices", json={"id": "plc-2"})
        assert plain.json()["routes"] == {}
        listed = api.get("/v1/devices").json()["items"]
        assert {d["id"]: d["routes"] for d in listed} == {
            "plc-1": {"mqtt": "local-broker", "udp": "ingest"},
            "plc-2": {},
        }

        audit = api.get(
            "/v1/audit", params={"target_id": "plc-1", "action": "device.update"}
        ).json()["items"]
        rerouted = audit[-1]  # newest first: the first update is last
        assert rerouted["before"]["routes"] == {"http": "api", "mqtt": "aws-iot"}
        assert rerouted["after"]["routes"] == {"mqtt": "local-broker", "udp": "ingest"}


def test_api_refuses_bad_routes_naming_the_field(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        assert _invalid(api.post("/v1/devices", json={"id": "d", "routes": {"MQTT": "aws"}})) == [
            "routes.MQTT"
        ]
        assert _invalid(api.post("/v1/devices", json={"id": "d", "routes": {"mqtt": 7}})) == [
            "routes.mqtt"
        ]
        assert _invalid(api.post("/v1/devices", json={"id": "d", "routes": ["mqtt"]})) == ["routes"]
        many = {f"l{n}": "d" for n in range(33)}
        assert _invalid(api.post("/v1/devices", json={"id": "d", "routes": many})) == ["routes"]
        assert api.get("/v1/devices/d").status_code == 404

        assert api.post("/v1/devices", json={"id": "d", "routes": {"mqtt": "aws"}}).is_success
        bad = api.patch("/v1/devices/d", json={"routes": {"mqtt": "Not A Name"}})
        assert _invalid(bad) == ["routes.mqtt"]
        assert "destination name" in bad.json()["detail"]
        assert api.get("/v1/devices/d").json()["routes"] == {"mqtt": "aws"}


def test_group_settings_routes_are_validated(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        bad = api.post(
            "/v1/groups", json={"name": "plant", "settings": {"routes": {"mqtt": "Bad Dest"}}}
        )
        assert _invalid(bad) == ["settings.routes.mqtt"]
        assert _invalid(
            api.post("/v1/groups", json={"name": "plant", "settings": {"routes": "aws"}})
        ) == ["settings.routes"]
        assert api.get("/v1/groups/plant").status_code == 404

        settings = {"routes": {"mqtt": "aws-iot"}, "region": "jp", "Free Form": [1, None]}
        created = api.post("/v1/groups", json={"name": "plant", "settings": settings})
        assert created.status_code == 201, created.text
        assert created.json()["settings"] == settings

        patched = api.patch("/v1/groups/plant", json={"settings": {"routes": {"-x": "aws"}}})
        assert _invalid(patched) == ["settings.routes.-x"]
        assert api.get("/v1/groups/plant").json()["settings"] == settings


def test_openapi_shows_routes(gateway: Gateway) -> None:
    with gateway.client(None) as anonymous:
        schemas = anonymous.get("/openapi.json").json()["components"]["schemas"]
    for name in ("DeviceIn", "DevicePatchIn", "DeviceOut"):
        routes = schemas[name]["properties"]["routes"]
        assert "settings.routes" in routes["description"], name
    assert "routes" in schemas["DeviceOut"]["required"]
    assert "routes" not in schemas["DeviceIn"].get("required", [])
    patch_values = json.dumps(schemas["DevicePatchIn"]["properties"]["routes"])
    assert '"null"' in patch_values  # null removes one route


def test_cli_sets_changes_and_clears_routes(gateway: Gateway) -> None:
    def ok(*args: str) -> str:
        result = run_cli(gateway, *args, token=ADMIN)
        assert result.returncode == 0, result.stderr
        return result.stdout

    added = json.loads(
        ok("device", "add", "p1", "--route", "mqtt=aws-iot", "--route", "http=api", "--json")
    )
    assert added["routes"] == {"http": "api", "mqtt": "aws-iot"}
    shown = ok("device", "show", "p1")
    assert "routes" in shown
    assert "http=api,mqtt=aws-iot" in shown

    changed = json.loads(
        ok("device", "update", "p1", "--route", "mqtt=local", "--unset-route", "http", "--json")
    )
    assert changed["routes"] == {"mqtt": "local"}
    replaced = json.loads(
        ok("device", "update", "p1", "--clear-routes", "--route", "udp=ingest", "--json")
    )
    assert replaced["routes"] == {"udp": "ingest"}
    cleared = json.loads(ok("device", "update", "p1", "--clear-routes", "--json"))
    assert cleared["routes"] == {}
    with gateway.client(ADMIN) as api:
        assert api.get("/v1/devices/p1").json()["routes"] == {}

    bad = run_cli(gateway, "device", "add", "p2", "--route", "mqtt", token=ADMIN)
    assert bad.returncode == 2
    assert "Invalid value for --route: 'mqtt' is not KEY=VALUE" in bad.stderr
    refused = run_cli(gateway, "device", "add", "p2", "--route", "mqtt=Bad", token=ADMIN)
    assert refused.returncode == 65
    assert "422 Request is invalid: destination name 'Bad' for listener mqtt" in refused.stderr
    with gateway.client(ADMIN) as api:
        assert api.get("/v1/devices/p2").status_code == 404
