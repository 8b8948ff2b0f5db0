"""The gateway's local CA: created on first start (software key, 0600), it issues the listener's server
certificate, whose SANs cover the host name and the gateway's current addresses, and sensors' certificates
(`LocalCA.issue`, the one certificate builder). Sensors trust it to authenticate the gateway
(`gatewayctl describe-endpoint` prints it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatewayd.stores import atomic
from gatewayd.stores.x509util import load_pem_certificates, not_after, not_before, same_public_key

CA_YEARS = 25  # outlives the 2049-12-31 default expiry of the certificates it issues (as AWS IoT's)
SERVER_DAYS = 397  # the CA/Browser Forum's limit, which sensor TLS stacks may also enforce
RENEW_WITHIN = dt.timedelta(days=30)
# How far back certificates are valid from, for sensors whose clock differs from the gateway's: a listener
# certificate made while the gateway's clock is synchronized tolerates an hour's difference, one made while
# it is not tolerates a month (a Pi's clock at boot is where its last shutdown left it) and is made again
# once the clock is set (service/downstream/listeners.py); the CA itself, never made again, tolerates a year.
SLACK_SYNCHRONIZED = dt.timedelta(hours=1)
SLACK_UNSYNCHRONIZED = dt.timedelta(days=30)
CA_SLACK = dt.timedelta(days=366)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def host_names_and_addresses(
    extra_addresses: list[str], interface_addresses: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses the server certificate should cover, from the host as it is now: the
    interfaces' addresses when known (rtnetlink), else what the host name resolves to."""
    hostname = socket.gethostname()
    names = sorted({hostname, socket.getfqdn(), "localhost"} - {""})
    ips = {"127.0.0.1", "::1", *[a for a in extra_addresses if a not in ("0.0.0.0", "::")]}
    if interface_addresses is not None:
        ips.update(interface_addresses)
    else:
        try:
            for info in socket.getaddrinfo(hostname, None):
                ips.add(str(info[4][0]).split("%")[0])
        except OSError:
            pass
    return names, sorted(ips, key=lambda a: (":" in a, a))


@dataclass(frozen=True)
class ServerIdentity:
    cert_file: Path
    key_file: Path
    names: tuple[str, ...]
    addresses: tuple[str, ...]


class LocalCA:
    def __init__(self, state_dir: Path, thing_name: str) -> None:
        self.dir = state_dir / "localca"
        self.thing_name = thing_name
        self.cert_file = self.dir / "ca.pem"
        self.key_file = self.dir / "ca.key"

    def ensure(self) -> bool:
        """Create the CA if it does not exist yet; True when it was created."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.cert_file.exists() and self.key_file.exists():
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gatewayd local CA {self.thing_name}")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CA_SLACK)
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        atomic.write_file(self.key_file, _key_pem(key), 0o600)  # the key first: a cert without it is useless
        atomic.write_file(self.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return True

    def server_name(self) -> str | None:
        """The name the listener's certificate carries for this host (its FQDN or host name; never
        localhost), if the certificate exists yet."""
        return _first_name(self.dir / "server.pem")

    def ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = load_pem_certificates(self.cert_file.read_bytes(), str(self.cert_file))[0]
        key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,  # what sensors' CSRs may carry
        common_name: str,
        valid_from: dt.datetime,
        valid_until: dt.datetime,
        server: bool = False,
        sans: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        """The one place a certificate is made from this CA: an end-entity certificate for `public_key`, its
        CN `common_name`, for client authentication (sensors) or, `server`, server authentication (the
        listener, with its `sans`); never valid beyond the CA itself."""
        ca_cert, ca_key = self.ca()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(min(valid_until, not_after(ca_cert)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        return builder.sign(ca_key, hashes.SHA256())

    def server_identity(
        self, names: list[str], addresses: list[str], clock_trusted: bool = True, reissue: bool = False
    ) -> ServerIdentity:
        """The listener's certificate: reused while it covers `names`/`addresses`, is valid now and not near
        expiry (`reissue`: made again regardless). Its validity starts SLACK_SYNCHRONIZED or, while the clock
        is not known to be right (`clock_trusted` False), SLACK_UNSYNCHRONIZED back."""
        cert_file, key_file = self.dir / "server.pem", self.dir / "server.key"
        wanted = (tuple(names), tuple(addresses))
        if cert_file.exists() and key_file.exists() and not reissue:
            current = load_pem_certificates(cert_file.read_bytes(), str(cert_file))[0]
            key_now = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            now = dt.datetime.now(dt.UTC)
            fresh = not_after(current) - now > RENEW_WITHIN and not_before(current) <= now
            # A power cut between writing the new key and its certificate leaves a mismatched pair: reissue.
            if (
                _sans(current) == wanted
                and fresh
                and same_public_key(current.public_key(), key_now.public_key())
            ):
                return ServerIdentity(cert_file, key_file, *wanted)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        slack = SLACK_SYNCHRONIZED if clock_trusted else SLACK_UNSYNCHRONIZED
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        start = now - slack
        cn = names[0] if names else self.thing_name
        cert = self.issue(key.public_key(), cn, start, start + dt.timedelta(days=SERVER_DAYS), True, sans)
        atomic.write_file(key_file, _key_pem(key), 0o600)
        atomic.write_file(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return ServerIdentity(cert_file, key_file, *wanted)


def _first_name(cert_file: Path) -> str | None:
    try:
        cert = load_pem_certificates(cert_file.read_bytes(), str(cert_file))[0]
    except (OSError, ValueError):
        return None
    names = [n for n in _sans(cert)[0] if n != "localhost"]  # not a name another machine can use
    for preferred in (socket.getfqdn(), socket.gethostname()):
        if preferred in names:
            return preferred
    return names[0] if names else None


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    names = tuple(ext.get_values_for_type(x509.DNSName))
    addresses = tuple(str(a) for a in ext.get_values_for_type(x509.IPAddress))
    return names, addresses
