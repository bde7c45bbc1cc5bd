"""Serial numbers (RFC 5280 §4.1.2.2, CA/B BR §7.1): unique, unpredictable, at least 64 bits."""

from __future__ import annotations

import itertools
from datetime import timedelta

from fleetgate.clock import FakeClock
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.store import Database
from fleetgate.store.certificates import CertificateQuery, CertificateRepo

from .pki_fixtures import add_device, build_services, make_csr, new_key, x509_of

COUNT = 200


async def test_issued_serials_are_distinct_random_and_at_least_64_bits(
    db: Database, clock: FakeClock
) -> None:
    pki = await build_services(db, clock)
    await add_device(pki, "serial-probe")
    csr = make_csr("serial-probe", new_key())
    for _ in range(COUNT):
        await pki.issuing.issue_for_device(
            SYSTEM_CALLER, "serial-probe", csr=csr, generate=None, lifetime=timedelta(days=1)
        )
    async with db.snapshot() as tx:
        issued = await CertificateRepo(tx).list(
            CertificateQuery(device_id="serial-probe"), limit=COUNT + 1
        )
    assert len(issued) == COUNT
    # The serial in each DER is the one recorded.
    serials = []
    for record in issued:
        value = x509_of(record).serial_number
        assert format(value, "x") == record.serial
        serials.append(value)

    assert len(set(serials)) == COUNT
    assert min(s.bit_length() for s in serials) >= 64
    assert all(0 < s < 2**159 for s in serials)  # positive, at most 20 octets
    # Not a counter: no two serials are anywhere near each other...
    ordered = sorted(serials)
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 2**32
    # ...and each of the low 64 bits takes both values across the batch.
    for bit in range(64):
        assert len({(s >> bit) & 1 for s in serials}) == 2, f"bit {bit} never changes"
