"""``cdp.tls``'s refusals name the file that cannot be used and never show a key."""

from __future__ import annotations

import pytest

from cdp.errors import ConfigError
from cdp.pki import LeafSpec, TlsFiles, ensure_site_pki, server_names
from cdp.tls import client_context, server_context


def test_a_missing_or_bad_tls_file_is_named_and_no_key_is_shown(tmp_path):
    files = TlsFiles(tmp_path / "tls")
    ensure_site_pki(files, "s", [LeafSpec("api", "cdp-api", server_names("0.0.0.0"))])
    cert, key = files.cert("api"), files.key("api")
    assert server_context(cert, key).minimum_version.name == "TLSv1_2"
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.key'}: cannot read the TLS private key"):
        server_context(cert, tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.pem'}: cannot read the TLS certificate"):
        server_context(tmp_path / "nope.pem", key)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'ca.pem'}: cannot read the CA certificate"):
        client_context(tmp_path / "ca.pem")
    # Another key than the certificate's: refused, naming both files, showing neither.
    other = TlsFiles(tmp_path / "other")
    ensure_site_pki(other, "s", [LeafSpec("api", "cdp-api", ("localhost",))])
    with pytest.raises(ConfigError) as refused:
        server_context(cert, other.key("api"))
    assert str(cert) in refused.value.message and str(other.key("api")) in refused.value.message
    secret = other.key("api").read_text().splitlines()[1]
    assert secret not in refused.value.message and "PRIVATE" not in refused.value.message
    # A wildcard listen address is no name a client dials.
    assert server_names("0.0.0.0", extra=("dr.example.net",)) == ("localhost", "127.0.0.1", "dr.example.net")
