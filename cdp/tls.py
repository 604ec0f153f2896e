"""The TLS contexts of the filter stream and the REST API, and what their failures mean.

Servers (a DRVA's filter port, the MSA's API) present a certificate of the site's CA
(``cdp.pki``); clients (the filters, ``cdp``'s verbs) trust that CA and nothing else —
not the system's store — and check that the certificate is for the name they dialled.
TLS 1.2 is the floor on both sides.

A file that cannot be used is a ``ConfigError`` naming the file, never its content (a
key never appears in a message). ``describe_tls_error`` turns the ``ssl`` module's
verification codes into a sentence that says what is wrong and what to do: "not signed
by the site CA" is the one an operator meets when a filter or the CLI is given another
site's CA, or the site's CA was replaced and a peer still has the old one.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from cdp.errors import ConfigError

TLS_VERSION_MIN = ssl.TLSVersion.TLSv1_2
#: A name a client may ask a server's certificate for (``server_name``, ``server_names``).
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")  # a DNS name or an IP address
SERVER_NAME_EXPECTED = "a host name or an IP address"
# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that mean "the issuer is not one we trust".
_UNTRUSTED_CODES = {
    2,   # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
    7,   # certificate signature failure
}
_EXPIRED_CODES = {9, 10}  # not yet valid, expired
# The certificate does not hold the name dialled: a host name (62), or an IP address (64).
_NAME_MISMATCH_CODES = {62, 64}


def _readable(path: Path, what: str) -> None:
    """``ConfigError`` naming ``path`` when it cannot be opened: ``ssl`` does not say
    which of a certificate and its key it failed to read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def server_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server's context: its certificate (chain) and key, TLS >= 1.2, no client
    certificates asked for (the filter proves itself by the handshake MAC, §9.1; a CLI by
    its token)."""
    _readable(cert, "TLS certificate")
    if key is not None:
        _readable(key, "TLS private key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = TLS_VERSION_MIN
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        files = f"{cert}" if key is None else f"{cert} and {key}"
        raise ConfigError(f"{files}: expected a PEM certificate and its private key "
                          f"({exc.reason or 'they do not load'})") from None
    return ctx


def client_context(ca: Path) -> ssl.SSLContext:
    """A client's context: trusts the certificates ``ca`` holds (the site's CA) and no
    other, and checks the server's name."""
    _readable(ca, "CA certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname on
    ctx.minimum_version = TLS_VERSION_MIN
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{ca}: expected a PEM CA certificate ({exc.reason or exc})") from None
    return ctx


def trusted_cas(ctx: ssl.SSLContext) -> str:
    """The CAs ``ctx`` trusts, by common name, for messages ("the CA 'cdp site CA site-a'")."""
    names = [value for cert in ctx.get_ca_certs() for rdn in cert.get("subject", ())
             for key, value in rdn if key == "commonName"]
    return f"the CA {', '.join(repr(n) for n in names)}" if names else "the site CA"


def describe_tls_error(exc: BaseException, peer: str, ca: Path | str | None = None,
                       ctx: ssl.SSLContext | None = None) -> str:
    """What a failed TLS connection to ``peer`` means, in a sentence; ``ca`` (the file)
    or ``ctx`` (the client context) say which CA was trusted."""
    trusted = f"the CA in {ca}" if ca is not None else trusted_cas(ctx) if ctx is not None else "the site CA"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, detail = exc.verify_code, exc.verify_message
        if code in _UNTRUSTED_CODES:
            return (f"TLS: {peer}'s certificate is not signed by {trusted} ({detail}): it is another CA's "
                    f"(another site's, or the site CA was replaced: give this client the current ca.pem)")
        if code in _EXPIRED_CODES:
            return f"TLS: {peer}'s certificate is not valid now ({detail}): rerun cdp install and restart it"
        if code in _NAME_MISMATCH_CODES:
            return (f"TLS: {peer}'s certificate is not for the name dialled ({detail}): add the name to "
                    f"[tls] server_names and rerun cdp install, or set the server name to one it holds")
        return f"TLS: {peer}'s certificate was refused ({detail})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING",
                      "PACKET_LENGTH_TOO_LONG"):
            return f"TLS: the handshake with {peer} failed ({reason}): does it serve TLS?"
        return f"TLS: the handshake with {peer} failed ({reason})"
    return f"{peer}: {type(exc).__name__}: {exc}"


__all__ = ["SERVER_NAME", "SERVER_NAME_EXPECTED", "TLS_VERSION_MIN", "client_context", "describe_tls_error",
           "server_context", "trusted_cas"]
