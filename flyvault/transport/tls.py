"""TLS pieces aioquic does not provide: the ephemeral server certificate and the exporter.

The exporter is RFC 8446 §7.5::

    TLS-Exporter(label, context, length) =
        HKDF-Expand-Label(Derive-Secret(exporter_master_secret, label, ""),
                          "exporter", Hash(context), length)

where ``Derive-Secret(s, l, "") = HKDF-Expand-Label(s, l, Hash(""), Hash.length)`` and the hash
is the negotiated suite's. aioquic has no exporter API, so ``transport.quic`` captures the
``exporter_master_secret`` from its key schedule at the moment the server Finished has been
hashed (the first 1-RTT key on either side) and hands it here.
"""

from __future__ import annotations

import datetime
import ipaddress

from aioquic.tls import hkdf_expand_label
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def export_keying_material(
    exporter_master_secret: bytes,
    algorithm: hashes.HashAlgorithm,
    label: bytes,
    length: int,
    context: bytes = b"",
) -> bytes:
    def digest(data: bytes) -> bytes:
        h = hashes.Hash(algorithm)
        h.update(data)
        return h.finalize()

    derived = hkdf_expand_label(
        algorithm, exporter_master_secret, label, digest(b""), algorithm.digest_size
    )
    return hkdf_expand_label(algorithm, derived, b"exporter", digest(context), length)


def generate_self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and self-signed certificate, made in memory at every start.

    Never stored: a restart must change the server's identity. Clients do not trust it by
    itself; the attestation JWT bound to the TLS exporter is what proves the machine.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fly-vault init")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("fly-vault"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding."""
    h = hashes.Hash(hashes.SHA256())
    h.update(certificate.public_bytes(serialization.Encoding.DER))
    return h.finalize().hex()
