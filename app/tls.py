"""HTTPS for ``--https``: browsers give the camera only to secure pages, and a page opened from
another machine over plain http is not one.

``--https`` makes a self-signed certificate on first use and keeps it in the cache folder
(``~/.cache/diffcam/tls``, or ``$XDG_CACHE_HOME/diffcam/tls``), so a browser that was told to trust
it once keeps trusting it. It names localhost, the machine's name and addresses and the address
served on; it is made again when it expires or does not name the address asked for.
``--ssl-certfile/--ssl-keyfile`` use a certificate of your own instead, as uvicorn's flags do.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365
#: a certificate this close to expiring is made again rather than used
RENEW_BEFORE = datetime.timedelta(days=7)


def cache_folder() -> Path:
    """Where the self-signed certificate is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffcam" / "tls"


def self_signed(host: str, folder: Path | None = None) -> tuple[Path, Path]:
    """(certificate, key) files for serving on ``host``: the kept ones, or new ones that name it."""
    folder = folder or cache_folder()
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    names = local_names(host)
    if cert_path.exists() and key_path.exists() and _still_good(cert_path, names):
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffcam (self-signed)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in sorted(names)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key: owner only
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def local_names(host: str) -> set[str]:
    """What a browser may call this machine: localhost, its loopback and own addresses, its name, ``host``."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    try:
        names |= {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:  # a name that does not resolve: the others still serve
        pass
    names.add(host.strip("[]"))
    return {_normal(name) for name in names if name and not _unspecified(name)}


def _normal(name: str) -> str:
    """An address as ``ipaddress`` writes it (so that kept and asked-for names compare), a name lower-cased."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _still_good(cert_path: Path, names: set[str]) -> bool:
    """The kept certificate is not about to expire and names everything asked for."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        named = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    kept = {str(value) for value in named.get_values_for_type(x509.DNSName)}
    kept |= {str(value) for value in named.get_values_for_type(x509.IPAddress)}
    expires = certificate.not_valid_after_utc
    return names <= kept and expires - datetime.datetime.now(datetime.timezone.utc) > RENEW_BEFORE
