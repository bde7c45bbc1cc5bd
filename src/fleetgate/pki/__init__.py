"""The certificate authority's mechanics: keys, profiles, issuance, CSRs, CRLs, OCSP.

Pure cryptography: no I/O, no store, time passed in. Services decide *what* to issue and keep
the results; this package only knows *how*.
"""
