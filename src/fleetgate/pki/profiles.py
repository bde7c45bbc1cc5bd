"""Certificate profiles: what each kind of certificate may do, as X.509 extensions.

Each profile sets key usage, extended key usage and basic constraints the way RFC 5280 and a
strict linter expect; lifetimes come from configuration.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


class Profile(enum.StrEnum):
    ROOT_CA = "root_ca"
    ISSUING_CA = "issuing_ca"
    DEVICE_CLIENT = "device_client"
    GATEWAY_SERVER = "gateway_server"
    UPSTREAM_CLIENT = "upstream_client"
    OCSP_RESPONDER = "ocsp_responder"


@dataclass(frozen=True)
class ProfileRules:
    is_ca: bool
    path_length: int | None
    extended_key_usages: tuple[x509.ObjectIdentifier, ...]
    revocation_info: bool  # carries CRL distribution point and AIA
    ocsp_nocheck: bool = False


RULES: dict[Profile, ProfileRules] = {
    Profile.ROOT_CA: ProfileRules(True, 1, (), revocation_info=False),
    # Points at the root's CRL and certificate (the root has no OCSP responder).
    Profile.ISSUING_CA: ProfileRules(True, 0, (), revocation_info=True),
    Profile.DEVICE_CLIENT: ProfileRules(
        False, None, (ExtendedKeyUsageOID.CLIENT_AUTH,), revocation_info=True
    ),
    Profile.UPSTREAM_CLIENT: ProfileRules(
        False, None, (ExtendedKeyUsageOID.CLIENT_AUTH,), revocation_info=True
    ),
    Profile.GATEWAY_SERVER: ProfileRules(
        False, None, (ExtendedKeyUsageOID.SERVER_AUTH,), revocation_info=True
    ),
    # A responder's own status is not checked (id-pkix-ocsp-nocheck), so it must be short-lived
    # and carries no pointers to revocation information.
    Profile.OCSP_RESPONDER: ProfileRules(
        False, None, (ExtendedKeyUsageOID.OCSP_SIGNING,), revocation_info=False, ocsp_nocheck=True
    ),
}


def key_usage(profile: Profile, *, rsa_key_exchange: bool) -> x509.KeyUsage:
    rules = RULES[profile]
    return x509.KeyUsage(
        digital_signature=not rules.is_ca or profile is Profile.ISSUING_CA,
        content_commitment=False,
        # TLS 1.2 RSA key transport needs it on RSA server certificates.
        key_encipherment=rsa_key_exchange and profile is Profile.GATEWAY_SERVER,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=rules.is_ca,
        crl_sign=rules.is_ca,
        encipher_only=False,
        decipher_only=False,
    )
