"""TLS for the loopback Discord: a throw-away CA and a leaf for 127.0.0.1/localhost.

discord.py always speaks https/wss (the voice gateway URL is hard-wired to ``wss://``), so the
local Discord must serve TLS that the bot can be told to trust without touching the system store.
:func:`generate_certificates` writes a fresh CA and leaf into a directory at start-up;
:func:`server_ssl_context` serves with the leaf and :func:`ssl_context_trusting` is what a client
(the bot, a test) uses to trust only that CA. Nothing here opens a socket.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Validity of the generated certificates: they live as long as one LocalDiscord; a day is plenty.
CERT_VALIDITY = datetime.timedelta(days=1)
#: Backdating absorbs small clock differences between the generator and the verifier.
CERT_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificatePaths:
    """PEM files written by :func:`generate_certificates`."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate_certificates(directory: Path) -> CertificatePaths:
    """Write a new CA (``ca.pem``) and a 127.0.0.1/localhost leaf (``cert.pem``, ``key.pem``)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - CERT_BACKDATE, now + CERT_VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("cantobot local Discord CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertificatePaths(
        ca_file=directory / "ca.pem",
        cert_file=directory / "cert.pem",
        key_file=directory / "key.pem",
    )
    paths.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert_file.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    paths.key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.key_file.chmod(0o600)
    return paths


def server_ssl_context(paths: CertificatePaths) -> ssl.SSLContext:
    """The context the local Discord serves https/wss with."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(paths.cert_file), str(paths.key_file))
    return ctx


def ssl_context_trusting(ca_file: str | Path) -> ssl.SSLContext:
    """A client context that verifies the peer against ``ca_file`` only (hostname checked)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    return ctx


def client_kwargs(ca_file: str | Path) -> dict[str, Any]:
    """Keyword arguments for ``discord.Client(...)`` to trust ``ca_file`` (call inside the loop).

    discord.py uses the one connector for REST, the gateway and the voice gateway.
    """
    import aiohttp  # here, so the certificate helpers above need no HTTP library

    return {"connector": aiohttp.TCPConnector(ssl=ssl_context_trusting(ca_file))}
