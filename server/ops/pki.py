"""The federation's key material: how each piece is made and where it lives.

A CA (EC P-384, offline), the SuperLink's TLS certificate signed by it, and one OpenSSH
key pair per hospital, in the formats Flower 1.42 loads (`load_ssh_private_key` for
`--auth-supernode-private-key`, `load_ssh_public_key` for `flwr supernode register`, PEM
for TLS). No flwr import: `cryptography` makes them. `server/ops/provision.py` decides
who gets which; `server/ops/handouts.py` writes what each participant reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# where each piece lives in the provisioned folder (the tree: `server/ops/provision.py`)
CA_DIR = "ca"
COORDINATOR_DIR = "coordinator"
HOSPITALS_DIR = "hospitals"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUB = "supernode.pub"
PUBKEYS_DIR = "supernode-keys"

_CURVE = ec.SECP384R1


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the named uses on (cryptography wants all nine)."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    unknown = set(allowed) - set(uses)
    if unknown:
        raise ValueError(f"unknown key usage(s): {sorted(unknown)}")
    return x509.KeyUsage(**{u: allowed.get(u, False) for u in uses})


@dataclass(frozen=True)
class Provisioned:
    """Where `provision()` put everything: each piece of key material by participant."""

    out: Path
    ca_dir: Path
    coordinator_dir: Path
    hospital_dirs: dict[str, Path]
    superlink_hosts: tuple[str, ...]
    superlink_port: int
    files: list[Path] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.coordinator_dir / CA_CERT

    @property
    def superlink_cert(self) -> Path:
        return self.coordinator_dir / SUPERLINK_CERT

    @property
    def superlink_key(self) -> Path:
        return self.coordinator_dir / SUPERLINK_KEY

    def public_key(self, hospital: str) -> Path:
        return self.coordinator_dir / PUBKEYS_DIR / f"{hospital}.pub"

    def private_key(self, hospital: str) -> Path:
        return self.hospital_dirs[hospital] / SUPERNODE_KEY

    def hospital_ca_cert(self, hospital: str) -> Path:
        return self.hospital_dirs[hospital] / CA_CERT


# ------------------------------------------------------------------ key material


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfuse federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = _name("medfuse federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=5))
        .not_valid_after(now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: Sequence[x509.GeneralName],
    cn: str,
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the names `sans` (its common name `cn`), CA-signed."""
    key = ec.generate_private_key(_CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=5))
        .not_valid_after(now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_agreement=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keypair(comment: str) -> tuple[bytes, bytes]:
    """(private OpenSSH PEM, public OpenSSH line) of a fresh EC P-384 key."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
