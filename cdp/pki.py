"""A site's certificate authority and the certificates it signs (FORMAT.md §20).

``cdp install`` with ``[tls] mode = "on"`` calls ``ensure_site_pki``: one CA per site
(EC P-256, ten years) and one leaf certificate per server — each DRVA's filter port and
the MSA's REST API — signed by it, with the names and addresses its clients dial as
subject alternative names. Every file lives in one directory (``cdp.pki_files.TlsFiles``):

    ca.pem  ca.key  drva-<name>.pem  drva-<name>.key  api.pem  api.key

Keys are written 0600 (``cdp.durable.atomic_write`` creates them so, then renames:
no reader ever sees a half-written or briefly world-readable key); certificates 0644.

Idempotent: a rerun keeps every file that is still good and renews, one by one, a leaf
whose certificate expires within ``RENEW_BEFORE_S``, whose names no longer match what
the site file asks for, that another CA signed, or whose key is missing or not the
certificate's. A CA near its own expiry is replaced, and then every leaf with it. The
CA key is read only when something must be signed: an operator may keep it offline,
and a rerun that has nothing to renew never asks for it.

Nothing here logs or returns key material: reports name files and actions only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.pki_files import LeafSpec, TlsFiles, server_names

CA_VALID_S = 10 * 365 * 86400  # the CA outlives many leaf rotations
LEAF_VALID_S = 397 * 86400  # the longest a public CA may issue today: rotation stays a habit
RENEW_BEFORE_S = 30 * 86400  # a rerun of install renews what expires within this
CLOCK_SKEW_S = 300  # not_before is backdated this much: a host a little behind accepts at once
CERT_MODE = 0o644
KEY_MODE = 0o600
DIR_MODE = 0o700
# --------------------------------------------------------------------------- reading


def read_cert(path: Path) -> x509.Certificate:
    """A PEM certificate, or ``ConfigError`` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the certificate ({exc.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None


def read_key(path: Path) -> Any:
    """A PEM private key, or ``ConfigError`` naming the file (never its content)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the private key ({exc.strerror})") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from None


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's subject alternative names (DNS names and IP addresses, as text)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple([*san.get_values_for_type(x509.DNSName),
                  *(str(a) for a in san.get_values_for_type(x509.IPAddress))])


def _expires_s(cert: x509.Certificate, now: dt.datetime) -> float:
    return (cert.not_valid_after_utc - now).total_seconds()


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_bytes(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- making


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any, now: dt.datetime,
             valid_s: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(now + dt.timedelta(seconds=valid_s)))


def make_ca(site: str, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cdp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"cdp site CA {site}")])
    cert = (_builder(name, name, key.public_key(), now, CA_VALID_S)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(spec: LeafSpec, ca: x509.Certificate, ca_key: Any,
              now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cdp"),
                         x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)])
    cert = (_builder(subject, ca.subject, key.public_key(), now, LEAF_VALID_S)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_san(spec.names), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: Any) -> None:
    """The key first (0600 from its creation), then the certificate: a crash between the
    two leaves a certificate whose key does not match, which the next run renews."""
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    os.chmod(key_path, KEY_MODE)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, CERT_MODE)


# --------------------------------------------------------------------------- keeping


def _leaf_problem(files: TlsFiles, spec: LeafSpec, ca: x509.Certificate, now: dt.datetime) -> str | None:
    """Why the leaf ``spec`` must be (re)issued, or None when it is good."""
    cert_path, key_path = files.cert(spec.stem), files.key(spec.stem)
    if not cert_path.exists():
        return "missing"
    try:
        cert = read_cert(cert_path)
        key = read_key(key_path)
    except ConfigError as exc:
        return exc.message
    if not _signed_by(cert, ca):
        return "signed by another CA"
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        return "its key is not the certificate's"
    if _expires_s(cert, now) < RENEW_BEFORE_S:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    if sorted(cert_names(cert)) != sorted(spec.names):
        return f"names {', '.join(cert_names(cert))} instead of {', '.join(spec.names)}"
    return None


def _ensure_ca(files: TlsFiles, site: str, now: dt.datetime) -> tuple[x509.Certificate, str]:
    if files.ca_cert.exists():
        ca = read_cert(files.ca_cert)
        if _expires_s(ca, now) >= RENEW_BEFORE_S:
            return ca, "kept"
        action = f"replaced (it expires {ca.not_valid_after_utc:%Y-%m-%d})"
    else:
        action = "created"
    ca, key = make_ca(site, now)
    _write_pair(files.ca_cert, files.ca_key, ca, key)
    return ca, action


def _dir_problem(st: os.stat_result, created: bool) -> str | None:
    """Why a TLS directory with this ``lstat``/``fstat`` is not ours alone, or None. One
    install itself just created is ours whatever its mode (it is set next)."""
    if not stat.S_ISDIR(st.st_mode):
        return "a symbolic link, never followed here" if stat.S_ISLNK(st.st_mode) else "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by uid {os.geteuid()} (this process)"
    if not created and st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):04o}: others may write in it"
    return None


def _dir_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"TLS directory {path}: {problem}; expected a directory owned by uid {os.geteuid()} "
                       f"that no one else may write (it holds the CA key): fix it, or point [tls] dir "
                       f"elsewhere (install creates it {DIR_MODE:04o})")


def _check_dir(path: Path) -> None:
    """``ConfigError`` when ``path`` exists and install would refuse it (``_private_dir``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (problem := _dir_problem(st, created=False)) is not None:
        raise _dir_error(path, problem)


def _private_dir(path: Path) -> None:
    """Make ``path`` a directory only we may enter (``DIR_MODE``): one created here, or
    one that already was ours and that no one else could write. Never through a
    symbolic link: the mode is set on the directory opened with ``O_NOFOLLOW``, so a
    link planted at ``path`` cannot make us chmod, and then fill, a directory elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP: a symbolic link; ENOTDIR: something else
        st = os.lstat(path)
        raise _dir_error(path, _dir_problem(st, created) or exc.strerror or str(exc)) from exc
    try:
        if (problem := _dir_problem(os.fstat(fd), created)) is not None:
            raise _dir_error(path, problem)
        os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def plan_site_pki(files: TlsFiles, leaves: Sequence[LeafSpec], *,
                  clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> dict[str, Any]:
    """What ``ensure_site_pki`` would do, writing nothing (``cdp preflight install``):
    ``{"ca": ACTION, "certs": {PATH: ACTION}, "needs_ca_key": bool}``, an action being
    ``keep``, ``create`` or ``renew (<reason>)``."""
    now = clock()
    _check_dir(files.dir)
    ca = read_cert(files.ca_cert) if files.ca_cert.exists() else None
    if ca is None:
        ca_action = "create"
    elif _expires_s(ca, now) < RENEW_BEFORE_S:
        ca_action = f"replace (it expires {ca.not_valid_after_utc:%Y-%m-%d})"
    else:
        ca_action = "keep"
    certs = {}
    for spec in leaves:
        problem = "missing" if ca is None or ca_action != "keep" else _leaf_problem(files, spec, ca, now)
        action = "keep" if problem is None else "create" if problem == "missing" else f"renew ({problem})"
        certs[str(files.cert(spec.stem))] = action
    return {"ca": ca_action, "certs": certs,
            "needs_ca_key": ca_action == "keep" and any(a != "keep" for a in certs.values())}


def ensure_site_pki(files: TlsFiles, site: str, leaves: Sequence[LeafSpec], *,
                    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> dict[str, Any]:
    """Make ``files`` hold a CA of ``site`` and a good certificate for each of ``leaves``
    (module docstring); return what was done, by file (no key material)."""
    now = clock()
    _private_dir(files.dir)
    ca, ca_action = _ensure_ca(files, site, now)
    ca_key = None
    report: dict[str, Any] = {"dir": str(files.dir), "ca": {"cert": str(files.ca_cert), "action": ca_action,
                                                            "expires": f"{ca.not_valid_after_utc:%Y-%m-%d}"}}
    out = []
    for spec in leaves:
        problem = _leaf_problem(files, spec, ca, now)
        if problem is None:
            action = "kept"
        else:
            if ca_key is None:
                if not files.ca_key.exists():
                    raise ConfigError(f"{files.ca_key}: missing, and the certificate {files.cert(spec.stem)} must "
                                      f"be issued ({problem}): put the CA key back (it may be kept offline "
                                      f"between installs), or move {files.dir} away to start a new CA")
                ca_key = read_key(files.ca_key)
            cert, key = make_leaf(spec, ca, ca_key, now)
            _write_pair(files.cert(spec.stem), files.key(spec.stem), cert, key)
            action = "created" if problem == "missing" else f"renewed ({problem})"
        out.append({"cert": str(files.cert(spec.stem)), "names": list(spec.names), "action": action})
    report["certs"] = out
    return report


__all__ = [
    "CA_VALID_S", "LEAF_VALID_S", "RENEW_BEFORE_S", "LeafSpec", "TlsFiles", "cert_names", "ensure_site_pki",
    "make_ca", "make_leaf", "plan_site_pki", "read_cert", "read_key", "server_names",
]
