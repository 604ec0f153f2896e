"""A store URL with credentials in it is refused, and no part of the secret is ever shown:
not when the password holds "/", "?", "#", "@" or ":" (which end urlsplit's host early,
so it sees no user info), not in an error, the CLI's output (``--json`` too), a site
file's refusal or a preflight's job record. User info is found in the raw text
(``cdp.store.open``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.msa.config import load_site_config
from cdp.store import open_store, redact_url
from cdp.store.open import check_store_url
from tests.mgmt.test_site_config import SITE, write_site

ROOT = Path(__file__).resolve().parents[2]
CLI_EXIT_S = 120.0  # bounds a hang: a refusal answers at once

#: Secrets as they come, each with a character that ends urlsplit's host early or is "@"
#: itself; an AWS secret key often holds "/".
SECRETS = ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "pa?ss=wo&rd", "pa#ssword", "p@ss@word",
           "pa:ss:word", "a/b?c#d@e:f", "pa[ss"]
#: The URL around each secret: where the credentials go instead.
URLS = [("s3://AKIAEXAMPLE:{}@bucket-one/prefix", "AWS_SECRET_ACCESS_KEY"),
        ("s3://AKIAEXAMPLE:{}@bucket-one/prefix?region=eu-west-1", "AWS_SECRET_ACCESS_KEY"),
        ("azure://account:{}@container-one/prefix", "CDP_AZURE_CONNECTION_STRING"),
        ("S3://{}@bucket-one", "AWS_ACCESS_KEY_ID")]
CASES = [(form.format(secret), secret, where) for form, where in URLS for secret in SECRETS]


def shown(url: str, secret: str) -> list[str]:
    """The pieces of ``secret`` that must not appear: the whole, and each part of it
    between the characters that split URLs (a part of one letter says nothing)."""
    parts = [secret]
    for sep in "/?#@:&=[":
        parts += [p for chunk in parts for p in chunk.split(sep)]
    return sorted({p for p in parts if len(p) > 2})


@pytest.mark.parametrize("url,secret,where", CASES)
def test_credentials_are_refused_without_a_trace_of_the_secret(url: str, secret: str, where: str) -> None:
    for opening in (lambda: open_store(url, env={}), lambda: check_store_url(url)):
        with pytest.raises(ConfigError) as caught:
            opening()
        text = str(caught.value) + repr(caught.value)
        assert "credentials in the URL are refused" in text and where in text, text
        for piece in shown(url, secret):
            assert piece not in text, (piece, text)
        assert "***@bucket-one" in text or "***@container-one" in text, text


@pytest.mark.parametrize("url,secret,where", CASES)
def test_redaction_hides_everything_up_to_the_last_at(url: str, secret: str, where: str) -> None:
    redacted = redact_url(url)
    assert redacted.partition("://")[2].startswith("***@"), redacted
    assert all(piece not in redacted for piece in shown(url, secret)), redacted


def test_an_at_in_the_query_hides_the_rest_of_the_query() -> None:
    url = "s3://bucket/x?endpoint=http://u:pw@host&region=r&token=TOKEN-SECRET"
    with pytest.raises(ConfigError, match="credentials in the URL") as caught:
        check_store_url(url)
    assert "TOKEN-SECRET" not in str(caught.value) and "pw" not in str(caught.value)
    assert "TOKEN-SECRET" not in redact_url(url)


def test_a_file_url_with_a_host_does_not_quote_it() -> None:
    with pytest.raises(ConfigError, match="file URL with a host") as caught:
        check_store_url("file://user:pass/word@host/x")
    assert "pass" not in str(caught.value) and "word" not in str(caught.value)


def test_an_at_in_a_file_path_is_just_a_character(tmp_path: Path) -> None:
    check_store_url(f"file://{tmp_path}/a@b")
    check_store_url(f"{tmp_path}/a@b")


def cdp(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=CLI_EXIT_S, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRET_URL = f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix"


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_the_cli_never_prints_the_secret(as_json: list[str]) -> None:
    done = cdp("points", "7", "--store", SECRET_URL, *as_json)
    assert done.returncode == 2, done
    out = done.stdout + done.stderr
    assert "credentials in the URL are refused" in out and "s3://***@bucket/prefix" in out, out
    assert all(piece not in out for piece in shown(SECRET_URL, SECRET)), out


def test_a_site_file_and_its_preflight_never_keep_the_secret(tmp_path: Path) -> None:
    path = write_site(tmp_path, SITE.replace('store = "store"', f'store = "{SECRET_URL}"', 1))
    with pytest.raises(ConfigError, match="credentials in the URL are refused") as caught:
        load_site_config(path)
    assert SECRET not in str(caught.value)
    done = cdp("preflight", "system", "--config", str(path), "--json", cwd=tmp_path)
    assert done.returncode != 0
    texts = [done.stdout, done.stderr] + [p.read_text(errors="replace") for p in tmp_path.rglob("*")
                                          if p.is_file() and p != path]
    for text in texts:
        assert all(piece not in text for piece in shown(SECRET_URL, SECRET)), text
