"""core/der.py's reading of a certificate's validity, against cryptography's parser."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from gatewayd.core.der import certificate_validity
from gatewayd.stores.x509util import not_after, not_before
from gatewayd_dev import pki


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_validity_of_certificates_in_both_time_encodings(kind: str) -> None:
    root = pki.make_root("der-test", kind)
    # UTCTime up to 2049, GeneralizedTime from 2050 on (RFC 5280 section 4.1.2.5)
    for start, days in (
        (dt.datetime(2024, 3, 1, 12, 0, 5, tzinfo=dt.UTC), 30),
        (dt.datetime(2049, 12, 1, tzinfo=dt.UTC), 400),
    ):
        leaf = pki.make_client(root, "s", validity=pki.Validity.days(days, start))
        der = leaf.cert.public_bytes(serialization.Encoding.DER)
        assert certificate_validity(der) == (not_before(leaf.cert), not_after(leaf.cert))


def test_malformed_input_is_a_value_error() -> None:
    for junk in (b"", b"\x30", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x03\x02\x01\x01"):
        with pytest.raises(ValueError):
            certificate_validity(junk)
