"""Expiry alerts (LifecycleService.send_alerts) delivered to a real HTTP receiver on 127.0.0.1.

Thresholds 30, 7 and 1 days, plus 0 (expired); each is delivered once however often the pass
runs; failed deliveries are retried after a backoff, at most ``max_attempts`` times, and every
attempt is audited. What fleetgate renews by itself is alerted on only once its renewal is
overdue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from fleetgate.clock import FakeClock
from fleetgate.config.schema import AlertConfig
from fleetgate.pki.records import CaRole
from fleetgate.records import AuditEntry
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.revocation import responder_credential_id
from fleetgate.store import Database

from .helpers import audit_entries
from .pki_fixtures import (
    DAY,
    Webhook,
    add_device,
    advance_to,
    another_node,
    build_services,
    import_x509,
    issue_csr,
    issue_held,
    issuing_ca,
    running_webhook,
)

THIRTY, SEVEN, ONE, ZERO = 30 * DAY, 7 * DAY, DAY, 0


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    async with running_webhook() as receiver:
        yield receiver


def alerts(webhook: Webhook) -> AlertConfig:
    return AlertConfig(thresholds_days=(30, 7, 1), webhook_url=webhook.url, max_attempts=3)


def key(subject: str, threshold_s: int) -> str:
    return f"{subject}@{threshold_s}"


async def alert_log(db: Database, target_id: str) -> list[dict[str, Any]]:
    """The ``alert.expiry`` audit entries about ``target_id``, oldest first."""
    entries: list[AuditEntry] = await audit_entries(db, action="alert.expiry", target_id=target_id)
    return [dict(e.after or {}) for e in reversed(entries)]


async def test_an_imported_certificate_is_alerted_once_per_threshold(
    pki: Services, db: Database, clock: FakeClock, webhook: Webhook
) -> None:
    config = alerts(webhook)
    credential = await import_x509(pki, clock, "ext-broker", timedelta(days=40))
    assert credential.not_after is not None
    subject = "imported:ext-broker"

    assert await pki.lifecycle.send_alerts(config) == ([], [])
    expected: list[tuple[str, float]] = []
    for threshold in (THIRTY, SEVEN, ONE, ZERO):
        advance_to(clock, credential.not_after - timedelta(seconds=threshold + 1))
        assert await pki.lifecycle.send_alerts(config) == ([], [])
        assert webhook.subjects() == expected

        clock.advance(2)  # just under the threshold
        assert await pki.lifecycle.send_alerts(config) == ([key(subject, threshold)], [])
        expected.append((subject, threshold / DAY))
        assert webhook.subjects() == expected
        body = webhook.bodies[-1]
        assert body["event"] == "expiry"
        assert body["kind"] == "imported"
        assert body["id"] == "ext-broker"
        assert body["credential_id"] == "ext-broker"
        assert body["not_after"] == credential.not_after.isoformat()
        assert body["renews_automatically"] is False
        assert body["at"] == clock.now().isoformat()

        # Running again, now or a little later, sends nothing more.
        assert await pki.lifecycle.send_alerts(config) == ([], [])
        clock.advance(600)
        assert await pki.lifecycle.send_alerts(config) == ([], [])
        assert webhook.subjects() == expected

    clock.advance(10 * DAY)
    assert await pki.lifecycle.send_alerts(config) == ([], [])
    assert webhook.subjects() == [(subject, 30.0), (subject, 7.0), (subject, 1.0), (subject, 0.0)]
    logged = await alert_log(db, "ext-broker")
    assert [(e["threshold_days"], e["attempt"], e["delivered"]) for e in logged] == [
        (30.0, 1, True),
        (7.0, 1, True),
        (1.0, 1, True),
        (0.0, 1, True),
    ]


async def test_crossing_several_thresholds_at_once_sends_one_alert(
    pki: Services, db: Database, clock: FakeClock, webhook: Webhook
) -> None:
    config = alerts(webhook)
    await import_x509(pki, clock, "ext-late", timedelta(days=5))
    assert await pki.lifecycle.send_alerts(config) == ([key("imported:ext-late", SEVEN)], [])
    assert webhook.subjects() == [("imported:ext-late", 7.0)]
    assert await pki.lifecycle.send_alerts(config) == ([], [])
    clock.advance(3600)
    assert await pki.lifecycle.send_alerts(config) == ([], [])
    assert webhook.subjects() == [("imported:ext-late", 7.0)]
    assert [e["threshold_days"] for e in await alert_log(db, "ext-late")] == [7.0]

    clock.advance(4 * DAY - 3600)
    assert await pki.lifecycle.send_alerts(config) == ([key("imported:ext-late", ONE)], [])
    assert webhook.subjects() == [("imported:ext-late", 7.0), ("imported:ext-late", 1.0)]


async def test_failed_deliveries_back_off_stop_after_max_attempts_and_are_audited(
    pki: Services, db: Database, clock: FakeClock, webhook: Webhook
) -> None:
    config = alerts(webhook)
    webhook.status = 500
    await import_x509(pki, clock, "ext-down", timedelta(days=20))
    alert = key("imported:ext-down", THIRTY)

    assert await pki.lifecycle.send_alerts(config) == ([], [alert])
    for wait in (60, 120):  # minutes 2**0, 2**1 after attempts 1, 2
        assert await pki.lifecycle.send_alerts(config) == ([], [])
        clock.advance(wait - 1)
        assert await pki.lifecycle.send_alerts(config) == ([], [])
        clock.advance(1)
        assert await pki.lifecycle.send_alerts(config) == ([], [alert])
    # Three attempts made: no more, however long we wait (short of the next threshold).
    for _ in range(6):
        clock.advance(3 * 3600)
        assert await pki.lifecycle.send_alerts(config) == ([], [])
    assert webhook.subjects() == [("imported:ext-down", 30.0)] * 3

    logged = await alert_log(db, "ext-down")
    assert [(e["attempt"], e["delivered"], e["error"]) for e in logged] == [
        (n, False, "webhook answered 500") for n in (1, 2, 3)
    ]
    assert {e["threshold_days"] for e in logged} == {30.0}

    # The next threshold is a new alert with attempts of its own; this time the second works.
    webhook.statuses = [503]
    webhook.status = 200
    advance_to(clock, clock.now() + timedelta(days=13, hours=1))
    assert await pki.lifecycle.send_alerts(config) == ([], [key("imported:ext-down", SEVEN)])
    clock.advance(60)
    assert await pki.lifecycle.send_alerts(config) == ([key("imported:ext-down", SEVEN)], [])
    clock.advance(3600)
    assert await pki.lifecycle.send_alerts(config) == ([], [])
    logged = await alert_log(db, "ext-down")
    assert [(e["threshold_days"], e["attempt"], e["delivered"]) for e in logged[3:]] == [
        (7.0, 1, False),
        (7.0, 2, True),
    ]
    assert logged[3]["error"] == "webhook answered 503"
    assert logged[4]["error"] is None


async def test_an_unreachable_webhook_is_a_failed_attempt(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    async with running_webhook() as gone:
        url = gone.url
    config = AlertConfig(thresholds_days=(30, 7, 1), webhook_url=url, max_attempts=3)
    await import_x509(pki, clock, "ext-nowhere", timedelta(days=2))
    sent, failed = await pki.lifecycle.send_alerts(config)
    assert (sent, failed) == ([], [key("imported:ext-nowhere", SEVEN)])
    (entry,) = await alert_log(db, "ext-nowhere")
    assert entry["delivered"] is False
    assert "Connect" in entry["error"]


async def test_what_fleetgate_renews_itself_is_not_alerted_while_renewal_is_on_time(
    pki: Services, clock: FakeClock, webhook: Webhook
) -> None:
    config = alerts(webhook)
    ca = await issuing_ca(pki)
    await add_device(pki, "held")
    await add_device(pki, "from-csr")
    _, held = await issue_held(pki, "held", timedelta(days=29))
    from_csr = await issue_csr(pki, "from-csr", timedelta(days=29))

    # A pass makes the CRL (7 days) and the OCSP responder (30 days): both inside the widest
    # threshold at once, like the held device certificate. Only the CSR one is alerted.
    report = await pki.lifecycle.maintain(config)
    assert report.alerts_sent == [key(f"certificate:{from_csr.serial}", THIRTY)]
    assert report.alerts_failed == []
    responder = await pki.credentials.get(SYSTEM_CALLER, responder_credential_id(ca.id))
    assert responder.not_after is not None
    assert responder.not_after <= clock.now() + timedelta(days=30)
    assert (await pki.revocation.crl()).next_update <= clock.now() + timedelta(days=7)

    for _ in range(30):  # a month of daily passes: CRL refreshed, certificates renewed
        clock.advance(DAY)
        report = await pki.lifecycle.maintain(config)
        assert report.alerts_failed == []
        assert all(a.startswith(f"certificate:{from_csr.serial}@") for a in report.alerts_sent)
    assert {s for s, _ in webhook.subjects()} == {f"certificate:{from_csr.serial}"}
    assert (await pki.revocation.certificate(SYSTEM_CALLER, held.serial)).renewed_by is not None


async def test_self_renewed_items_are_alerted_once_their_renewal_is_overdue(
    pki: Services, clock: FakeClock, webhook: Webhook
) -> None:
    config = alerts(webhook)
    ca = await issuing_ca(pki)
    await add_device(pki, "held")
    _, held = await issue_held(pki, "held", timedelta(days=30))
    await pki.lifecycle.maintain(config)
    assert webhook.bodies == []

    # Maintenance stops; alerts alone keep running. Once the renewal point (and a grace of a
    # few maintenance intervals) has passed, the alert says renewal is failing.
    clock.advance(10 * DAY)
    # Every CA that publishes a CRL is overdue: the issuing CA's and the root's.
    sent, failed = await pki.lifecycle.send_alerts(config)
    root = next(a for a in await pki.authority.authorities() if a.role is CaRole.ROOT)
    assert failed == []
    assert sorted(sent) == sorted([key(f"crl:{ca.id}", ZERO), key(f"crl:{root.id}", ZERO)])
    clock.advance(10 * DAY + 3600)
    sent, failed = await pki.lifecycle.send_alerts(config)
    responder = await pki.credentials.get(SYSTEM_CALLER, responder_credential_id(ca.id))
    assert failed == []
    assert sorted(sent) == sorted(
        [
            key(f"certificate:{held.serial}", THIRTY),
            key(f"certificate:{responder.certificate_serial}", THIRTY),
        ]
    )
    renewing = {b["subject"]: b["renews_automatically"] for b in webhook.bodies}
    assert set(renewing.values()) == {True}


async def test_two_nodes_never_deliver_the_same_alert_twice(
    pki: Services, clock: FakeClock, webhook: Webhook
) -> None:
    """Node B runs its pass while node A's delivery is still waiting for the receiver's answer
    (the receiver runs B's pass before it answers A). The claim in the store must keep B from
    delivering A's alert again."""
    config = alerts(webhook)
    other = another_node(pki, clock)
    await import_x509(pki, clock, "ext-shared", timedelta(days=20))
    during: list[tuple[list[str], list[str]]] = []

    async def other_node_pass(_: dict[str, Any]) -> None:
        during.append(await other.lifecycle.send_alerts(config))

    webhook.on_request = other_node_pass
    first = await pki.lifecycle.send_alerts(config)
    assert first == ([key("imported:ext-shared", THIRTY)], [])
    assert webhook.subjects() == [("imported:ext-shared", 30.0)], (
        "the same alert was delivered by both nodes"
    )
    assert during == [([], [])]


async def test_an_imported_credential_replaced_under_the_same_id_is_alerted_again(
    pki: Services, clock: FakeClock, webhook: Webhook
) -> None:
    """Rotating an imported certificate means deleting the credential and importing the new
    certificate under the same id (routes name it). The new certificate expires too, and must
    be alerted on like the first one was."""
    config = alerts(webhook)
    await import_x509(pki, clock, "ext-rotated", timedelta(days=20))
    assert await pki.lifecycle.send_alerts(config) == ([key("imported:ext-rotated", THIRTY)], [])

    await pki.credentials.delete(SYSTEM_CALLER, "ext-rotated")
    fresh = await import_x509(pki, clock, "ext-rotated", timedelta(days=365))
    assert fresh.not_after is not None
    advance_to(clock, fresh.not_after - timedelta(days=30) + timedelta(seconds=1))
    sent, _ = await pki.lifecycle.send_alerts(config)
    assert webhook.subjects() == [("imported:ext-rotated", 30.0)] * 2, (
        "the new certificate reached 30 days left without an alert"
    )
    assert sent == [key("imported:ext-rotated", THIRTY)]


async def test_a_csr_issued_certificate_is_alerted_at_expiry_too(
    pki: Services, clock: FakeClock, webhook: Webhook
) -> None:
    """docs/pki.md: alerts at 30, 7 and 1 days "and at expiry" for everything fleetgate cannot
    renew itself, CSR-issued certificates included (imported credentials get all four)."""
    config = alerts(webhook)
    await add_device(pki, "csr-only")
    cert = await issue_csr(pki, "csr-only", timedelta(days=10))
    subject = f"certificate:{cert.serial}"
    assert await pki.lifecycle.send_alerts(config) == ([key(subject, THIRTY)], [])
    for threshold in (SEVEN, ONE):
        advance_to(clock, cert.not_after - timedelta(seconds=threshold - 1))
        assert await pki.lifecycle.send_alerts(config) == ([key(subject, threshold)], [])
    advance_to(clock, cert.not_after + timedelta(seconds=1))
    await pki.lifecycle.send_alerts(config)
    assert webhook.subjects() == [
        (subject, 30.0),
        (subject, 7.0),
        (subject, 1.0),
        (subject, 0.0),
    ], "no alert when the certificate expired"
