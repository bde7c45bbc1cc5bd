"""Workers' data-plane metrics reach the main process's exposition: labelled per process, left
out once stale, and a broken snapshot never breaks a scrape."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetgate.clock import FakeClock
from fleetgate.metrics import Metrics
from fleetgate.metrics_share import (
    MAX_SNAPSHOT_BYTES,
    STALE_S,
    Publisher,
    merged,
    snapshot_path,
)


def _connections(text: bytes) -> dict[str, float]:
    """relayed connections of listener ``plc`` by process."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "fleetgate_listener_connections":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["listener"] == "plc":
                    found[sample.labels["process"]] = sample.value
    return found


def _counted(metrics: Metrics, n: int) -> Metrics:
    metrics.listener_connections.labels("plc", "relayed").inc(n)
    return metrics


def test_every_fresh_worker_snapshot_is_served_per_process(tmp_path: Path) -> None:
    clock = FakeClock()
    main = _counted(Metrics(), 1)
    for index, count in ((1, 2), (2, 5)):
        registry = _counted(Metrics(), count).registry
        Publisher(registry, snapshot_path(tmp_path, index), clock).publish()
    text = generate_latest(merged(main.registry, tmp_path, clock))
    assert _connections(text) == {"main": 1.0, "worker-1": 2.0, "worker-2": 5.0}
    # One family, one TYPE line: what strict parsers (Prometheus itself) require.
    assert text.count(b"# TYPE fleetgate_listener_connections_total counter") == 1
    assert b"fleetgate_build_info" in text  # families workers do not share pass untouched


def test_a_stale_snapshot_is_left_out_and_a_withdrawn_one_is_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    main = _counted(Metrics(), 1)
    stale = Publisher(_counted(Metrics(), 2).registry, snapshot_path(tmp_path, 1), clock)
    stale.publish()
    clock.advance(STALE_S + 1)
    fresh = Publisher(_counted(Metrics(), 3).registry, snapshot_path(tmp_path, 2), clock)
    fresh.publish()
    text = generate_latest(merged(main.registry, tmp_path, clock))
    assert _connections(text) == {"main": 1.0, "worker-2": 3.0}
    fresh.withdraw()
    assert not snapshot_path(tmp_path, 2).exists()
    text = generate_latest(merged(main.registry, tmp_path, clock))
    assert _connections(text) == {"main": 1.0}


def test_broken_snapshots_are_skipped_not_fatal(tmp_path: Path) -> None:
    clock = FakeClock()
    main = _counted(Metrics(), 1)
    good = snapshot_path(tmp_path, 3)
    Publisher(_counted(Metrics(), 4).registry, good, clock).publish()
    (tmp_path / "metrics" / "worker-1.json").write_text("{not json")
    (tmp_path / "metrics" / "worker-2.json").write_bytes(b" " * (MAX_SNAPSHOT_BYTES + 1))
    samples = [["x_total", "not labels", 1], 7, ["y_total", {}, "NaNx"]]
    (tmp_path / "metrics" / "worker-4.json").write_text(
        json.dumps(
            {
                "at": clock.now().timestamp(),
                "families": [{"name": "fleetgate_listener_connections", "samples": samples}],
            }
        )
    )
    text = generate_latest(merged(main.registry, tmp_path, clock))
    assert _connections(text) == {"main": 1.0, "worker-3": 4.0}
