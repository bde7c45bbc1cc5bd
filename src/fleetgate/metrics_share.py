"""The data-plane metrics of every process of a node, served by the main process's ``/metrics``.

With ``node.workers = N`` the kernel spreads device connections over N processes, and each
counts what it relays in its own registry. Every worker writes a snapshot of its data-plane
families (:data:`SHARED`) to ``<data dir>/metrics/worker-<index>.json`` each
:data:`PUBLISH_S` (written aside, then renamed: a reader never sees half a file), and removes it
when it stops. The main process serves its own series and every fresh snapshot's, each with a
``process`` label (``main``, ``worker-1``…): per process, as Prometheus wants, so a worker that
restarts reads as a counter reset of its own series (which ``rate()`` handles) instead of a
drop in a sum. A snapshot older than :data:`STALE_S` (a worker that died without removing it)
is left out. Figures from workers are at most :data:`PUBLISH_S` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from fleetgate.clock import Clock

SHARED = frozenset(
    {
        "fleetgate_listener_up",
        "fleetgate_listener_connections",
        "fleetgate_listener_active_connections",
        "fleetgate_listener_relayed_bytes",
        "fleetgate_listener_relays",
    }
)
PUBLISH_S = 1.0
STALE_S = 5 * PUBLISH_S
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024  # a snapshot is read whole: a bound on what is trusted
PROCESS_LABEL = "process"
DIRECTORY = "metrics"


def snapshot_path(data_dir: Path, index: int) -> Path:
    return data_dir / DIRECTORY / f"worker-{index}.json"


def _samples(registry: CollectorRegistry) -> list[dict[str, Any]]:
    families = []
    for family in registry.collect():
        if family.name not in SHARED:
            continue
        families.append(
            {
                "name": family.name,
                "help": family.documentation,
                "type": family.type,
                "samples": [[s.name, s.labels, s.value] for s in family.samples],
            }
        )
    return families


class Publisher:
    """A worker's side: its data-plane families, written every :data:`PUBLISH_S`."""

    def __init__(self, registry: CollectorRegistry, path: Path, clock: Clock) -> None:
        self._registry = registry
        self._path = path
        self._clock = clock

    def publish(self) -> None:
        self._path.parent.mkdir(mode=0o700, exist_ok=True)
        body = json.dumps(
            {"at": self._clock.now().timestamp(), "families": _samples(self._registry)}
        )
        aside = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        aside.write_text(body)
        os.replace(aside, self._path)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.to_thread(self.publish)
                await asyncio.sleep(PUBLISH_S)
        finally:
            self.withdraw()

    def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


def _fresh_snapshots(directory: Path, now: float) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(process label, families) of every worker snapshot young enough to be believed."""
    for path in sorted(directory.glob("worker-*.json")):
        try:
            with path.open("rb") as file:
                raw = file.read(MAX_SNAPSHOT_BYTES + 1)
            if len(raw) > MAX_SNAPSHOT_BYTES:
                continue
            snapshot = json.loads(raw)
            at, families = float(snapshot["at"]), list(snapshot["families"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile, or not ours: left out, never a failed scrape
        if now - at <= STALE_S:
            yield path.stem, families


class _Families:
    """What ``generate_latest`` needs: something with ``collect()``."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merged(registry: CollectorRegistry, data_dir: Path, clock: Clock) -> _Families:
    """The main process's registry with every fresh worker snapshot folded into the shared
    families, each series labelled with the process that counted it."""
    workers = list(_fresh_snapshots(data_dir / DIRECTORY, clock.now().timestamp()))
    out: list[Metric] = []
    for family in registry.collect():
        if family.name not in SHARED:
            out.append(family)
            continue
        combined = Metric(family.name, family.documentation, family.type)
        for sample in family.samples:
            combined.add_sample(sample.name, {**sample.labels, PROCESS_LABEL: "main"}, sample.value)
        for process, families in workers:
            for other in families:
                if not isinstance(other, dict) or other.get("name") != family.name:
                    continue
                for name, labels, value in _valid_samples(other.get("samples")):
                    combined.add_sample(name, {**labels, PROCESS_LABEL: process}, value)
        out.append(combined)
    return _Families(out)


def _valid_samples(samples: object) -> Iterator[tuple[str, dict[str, str], float]]:
    if not isinstance(samples, list):
        return
    for sample in samples:
        try:
            name, labels, value = sample
            if isinstance(name, str) and isinstance(labels, dict):
                yield name, {str(k): str(v) for k, v in labels.items()}, float(value)
        except (TypeError, ValueError):
            continue
