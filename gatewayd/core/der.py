"""The few DER (X.690) constructions needed to assemble a PKCS#10 CSR around an externally made signature.

A TPM-held key cannot be handed to a CSR builder on every supported platform (bookworm's tpm2-pytss has no
`cryptography` key wrapper), so the CSR is assembled here: CertificationRequestInfo is built, signed by
whatever holds the key, and wrapped (RFC 2986, section 4).
"""

from __future__ import annotations

import datetime as dt

# AlgorithmIdentifier DER for each signature algorithm (RFC 5758 section 3.2; RFC 4055 section 5).
_ALGORITHMS = {
    "ecdsa-sha256": bytes.fromhex("300a06082a8648ce3d040302"),  # ecdsa-with-SHA256, no parameters
    "ecdsa-sha384": bytes.fromhex("300a06082a8648ce3d040303"),  # ecdsa-with-SHA384
    "rsa-sha256": bytes.fromhex("300d06092a864886f70d01010b0500"),  # sha256WithRSAEncryption, NULL
}


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size


def tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + length(len(body)) + body


def sequence(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative integers are needed here")
    body = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big")  # a leading 0 keeps it positive
    return tlv(0x02, body)


def bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)  # no unused bits


def ecdsa_signature(r: int, s: int) -> bytes:
    """ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } (RFC 3279 section 2.2.3)."""
    return sequence(integer(r), integer(s))


def certification_request_info(subject_der: bytes, spki_der: bytes) -> bytes:
    """version 0, subject, subjectPKInfo, and an empty [0] attributes set."""
    return sequence(integer(0), subject_der, spki_der, b"\xa0\x00")


def certification_request(info: bytes, algorithm: str, signature: bytes) -> bytes:
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"unsupported signature algorithm {algorithm!r}")
    return sequence(info, _ALGORITHMS[algorithm], bit_string(signature))


# ---------------------------------------------------------------- reading: a certificate's validity


def _read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the contents, end of the contents) of the TLV at `pos`; ValueError when malformed."""
    if pos + 2 > len(data):
        raise ValueError("DER cut short")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        size = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + size > len(data):
        raise ValueError("DER cut short")
    return tag, pos, pos + size


def _time(tag: int, text: bytes) -> dt.datetime:
    value = text.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 section 4.1.2.5.1)
        year = int(value[:2])
        value = f"{1900 + year if year >= 50 else 2000 + year}{value[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    return dt.datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def certificate_validity(cert_der: bytes) -> tuple[dt.datetime, dt.datetime]:
    """notBefore and notAfter of an X.509 certificate in DER (RFC 5280 section 4.1), for messages about a
    peer's certificate where the full parser is not loaded."""
    _, pos, _ = _read(cert_der, 0)  # Certificate
    _, pos, _ = _read(cert_der, pos)  # tbsCertificate
    tag, _, end = _read(cert_der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _read(cert_der, pos)
    _, pos, _ = _read(cert_der, pos)  # validity
    tag, start, end = _read(cert_der, pos)
    not_before = _time(tag, cert_der[start:end])
    tag, start, end = _read(cert_der, end)
    return not_before, _time(tag, cert_der[start:end])
