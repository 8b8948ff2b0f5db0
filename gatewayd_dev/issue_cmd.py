"""A certificate-issuing command for tests and the demo (renewal's `command` issuer): reads a CSR (PEM) on
stdin, prints a certificate and the CA (PEM) on stdout. Faults on request, to test every way an issuer fails.

    python -m gatewayd_dev.issue_cmd --ca-cert CA.pem --ca-key CA.key [--minutes M] [--fault F]

Faults: exit (status 3 with a message on stderr), hang (sleep forever), garbage (not PEM), other-key (a
certificate for a different key), expired (a certificate that has already expired).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd_dev import pki


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca-cert", required=True)
    parser.add_argument("--ca-key", required=True)
    parser.add_argument("--minutes", type=float, default=60 * 24 * 365)
    parser.add_argument("--fault", choices=["exit", "hang", "garbage", "other-key", "expired"])
    args = parser.parse_args()
    csr_pem = sys.stdin.buffer.read()
    ca_cert = x509.load_pem_x509_certificate(Path(args.ca_cert).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(args.ca_key).read_bytes(), None)
    issuer = pki.Issued(ca_cert, ca_key)  # type: ignore[arg-type]
    validity = pki.Validity.days(args.minutes / 1440)
    match args.fault:
        case "exit":
            print("issuer: the CA refused the request (quota exceeded)", file=sys.stderr)
            return 3
        case "hang":
            time.sleep(3600)
        case "garbage":
            sys.stdout.write("this is not a certificate\n")
            return 0
        case "other-key":
            other = pki.new_key("ecc")
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.load_pem_x509_csr(csr_pem).subject)
                .sign(other, hashes.SHA256())
            )
            csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        case "expired":
            start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
            validity = pki.Validity(start, start + dt.timedelta(days=1))
    cert = pki.sign_client_csr(issuer, csr_pem, validity)
    sys.stdout.buffer.write(pki.pem(cert, ca_cert))
    return 0


if __name__ == "__main__":
    sys.exit(main())
