"""Hostile client input to the MSA's REST API (issue 10, item 7): every refusal is a 4xx
JSON error (FORMAT.md §13.5) that names the field, never a 500, never a job that fails
with "internal error", and never an absolute path of the daemon's machine.

The listed cases first, each as the hostile tester sent it (raw bytes on a socket where
an HTTP client would clean the request up); then a pass over every route and every
field of every request body."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cdp.msa.api import ROUTES
from cdp.testing.site import TOKEN
from tests.mgmt.test_api import Api, api  # noqa: F401  (the fixture)

RAW_TIMEOUT_S = 30.0


async def raw(api: Api, head: str, body: bytes = b"", *, extra: bytes = b"") -> tuple[int, dict[str, Any], bytes]:
    """Send one request as bytes (``head``: request line and headers, without the final
    CRLF); return its status, its JSON body (or {}) and the raw answer."""
    host, port = api.site.cfg.api_listen
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = head.rstrip("\r\n").encode("utf-8", "surrogateescape")
        if extra:
            request += b"\r\n" + extra
        request += b"\r\nConnection: close\r\n"
        if body:
            request += f"Content-Length: {len(body)}\r\n".encode()
        writer.write(request + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            answer = await reader.read()
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    payload = answer.partition(b"\r\n\r\n")[2]
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {}
    return status, doc, answer


def assert_refusal(api: Api, status: int, doc: Any, *, expect: int = 400, field: str | None = None) -> dict:
    """A JSON error of status ``expect`` naming ``field``, with no path of the daemon's site."""
    assert status == expect, (status, doc)
    err = doc["error"]
    assert err["status"] == expect and err["code"] and err["message"], err
    if field is not None:
        assert err["field"] == field, err
    text = json.dumps(doc)
    assert str(api.site.root) not in text and "/state" not in text, err  # no path of this machine
    assert "internal" not in err["code"] and "Traceback" not in text, err
    return err


def auth() -> str:
    return f"Authorization: Bearer {TOKEN}\r\n"


# ---------------------------------------------------------------------- the cases of the issue


async def test_non_ascii_bearer_header_is_401(api):
    host = f"Host: {api.site.cfg.api_listen}\r\n"
    for value in ("Bearer t\u00f6k\u00e9n-0123456789abcdef", "Bearer \udcff\udcfe", "B\u00e9arer x"):
        status, doc, _ = await raw(api, f"GET /v1/status HTTP/1.1\r\n{host}Authorization: {value}")
        assert_refusal(api, status, doc, expect=401)
    # Two Authorization headers, one of them right: neither counts.
    status, doc, _ = await raw(api, f"GET /v1/status HTTP/1.1\r\n{host}{auth()}Authorization: Bearer nope")
    assert_refusal(api, status, doc, expect=401)
    # The right token followed by a stray byte is still the wrong token.
    status, doc, _ = await raw(api, f"GET /v1/status HTTP/1.1\r\n{host}", extra=b"Authorization: Bearer "
                               + TOKEN.encode() + b"\xff")
    assert_refusal(api, status, doc, expect=401)


async def test_undecodable_body_and_bad_charset_are_4xx(api):
    host = f"Host: {api.site.cfg.api_listen}\r\n"
    head = f"POST /v1/domains/erp/verify HTTP/1.1\r\n{host}{auth()}"
    status, doc, _ = await raw(api, head + "Content-Type: application/json", b"\xff\xfe")
    err = assert_refusal(api, status, doc, field="request body")
    assert "UTF-8" in err["message"], err
    for charset in ("bogus-enc", "latin-1", "utf-16"):
        status, doc, _ = await raw(api, head + f"Content-Type: application/json; charset={charset}", b"{}")
        err = assert_refusal(api, status, doc, expect=415, field="Content-Type")
        assert "UTF-8" in err["message"], err
    status, doc, _ = await raw(api, head + "Content-Type: application/json; charset=UTF-8", b'{"deep": 3}')
    assert_refusal(api, status, doc, field="deep")  # utf-8 in any case is fine: the field is refused


async def test_deeply_nested_json_is_400(api):
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000,
                 '{"target": ' + "[" * 50_000 + "]" * 50_000 + ', "to": "/x"}'):
        got, doc, _ = await api.call("POST", "/v1/domains/erp/recover", data=body)
        err = assert_refusal(api, got, doc, field="request body")
        assert "nested" in err["message"], err


async def test_jobs_query_and_id_are_checked(api):
    for query in ("%C2%B2", "%EF%BC%91", "1e3", "-1", "99999999999999999999", "%FF", "%00"):
        got, doc, _ = await api.call("GET", f"/v1/jobs?limit={query}")
        assert_refusal(api, got, doc, field="limit")
    for job_id in ("a" * 300, "%C2%B2" * 3, "%EF%BC%91", "..", "%00", "%FF", "a%2Fb"):
        got, doc, _ = await api.call("GET", f"/v1/jobs/{job_id}")
        assert got in (400, 404), (job_id, got, doc)
        assert_refusal(api, got, doc, expect=got, field="id" if got == 400 else None)
    got, doc, _ = await api.call("GET", "/v1/jobs/20990101-000000-none-abcdef")  # well-formed, unknown
    err = assert_refusal(api, got, doc, expect=404, field="id")
    assert err["code"] == "unknown_job"


async def test_recover_time_out_of_range_is_400(api, tmp_path):
    for at in ("9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
               "9999-12-31T23:59:59-01:00", "-99999999999d", "-1" + "0" * 400 + "s", "1969-12-31T23:59:59Z"):
        got, doc, _ = await api.call("POST", "/v1/domains/erp/recover",
                                     {"target": {"at": at}, "to": str(tmp_path / "out")})
        err = assert_refusal(api, got, doc, field="target.at")
        assert "expected" in err["message"], err


async def test_recover_to_is_checked(api, tmp_path):
    plain = tmp_path / "a-file"
    plain.write_bytes(b"not a directory")
    for to, why in ((str(plain), "not a directory"), (str(plain / "below"), "not a directory"),
                    ("/tmp/x\u0000y", "NUL"), ("/tmp/x\ud800y", "surrogate"), ("/" + "a" * 5000, "long"), ("/tmp/" + "b" * 300 + "/x", "longer than 255")):
        got, doc, _ = await api.call("POST", "/v1/domains/erp/recover", {"target": "latest", "to": to})
        err = assert_refusal(api, got, doc, field="to")
        assert why in err["message"], err
    jobs = (await api.ok("GET", "/v1/jobs"))["jobs"]
    assert jobs == []  # nothing was started: refused at the edge, not as a failed job


async def test_head_healthz_is_200(api):
    host = f"Host: {api.site.cfg.api_listen}\r\n"
    status, _, answer = await raw(api, f"HEAD /healthz HTTP/1.1\r\n{host}")
    assert status == 200, answer
    got, doc, _ = await api.call("HEAD", "/v1/status", token=None)
    assert got == 401


# ---------------------------------------------------------------------- every route, every field

#: Values no field of any body accepts, as JSON text (some are not JSON at all).
HOSTILE = ("null", "-1", "1" + "0" * 400, "1e308", "-1e308", "NaN", "Infinity", '""', '"\\u0000"',
           '"\\ud800"', '"' + "x" * 100_000 + '"', "[]", "{}", "[[[[]]]]", '{"a": {"b": {}}}', '"\\u00b2"',
           '"' + "\u00e9" * 10 + '"', "-1.5e-320")
#: Each POST route's body fields with a valid value for each (so one field is wrong at a time).
FIELDS = {
    "/v1/domains/erp/protect": {"retention": '"1h"', "rpo_target_s": "30", "consolidate_after": '"1h"',
                                "consolidate_every": '"15m"'},
    "/v1/domains/erp/marks": {"name": '"m1"'},
    "/v1/domains/erp/recover": {"target": '"latest"', "to": '"/tmp/cdp-never-written"'},
    "/v1/domains/erp/verify": {"deep": "false", "sample": "0.5"},
}


def _body(fields: dict[str, str], key: str, value: str) -> str:
    return "{" + ", ".join(f'"{k}": {value if k == key else v}' for k, v in fields.items()) + "}"


async def test_every_field_of_every_body_refuses_hostile_values(api):
    for path, fields in FIELDS.items():
        for key in fields:
            for value in HOSTILE:
                got, doc, _ = await api.call("POST", path, data=_body(fields, key, value))
                err = assert_refusal(api, got, doc)
                assert err["field"] in (key, f"{key}.{'at'}", "request body") or err["field"].startswith(key), \
                    (path, key, value[:40], err)
                assert len(err["message"]) < 1000, (path, key, len(err["message"]))  # input is not echoed whole
    assert (await api.ok("GET", "/v1/jobs"))["jobs"] == []  # nothing started


async def test_every_route_refuses_bad_bodies_and_paths(api):
    host = f"Host: {api.site.cfg.api_listen}\r\n"
    posts = [p for m, p, _ in ROUTES if m == "POST"]
    json_cases = (("application/json", b"\xff\xfe", 400, "request body"),
                  ("application/json", b'{"x": 1}', 400, "x"),
                  ("application/json", b"[1]", 400, "request body"),
                  ("application/json", b"{\"a\": NaN}", 400, None),
                  ("application/json", b"[" * 100_000, 400, "request body"),
                  ("application/json; charset=bogus-enc", b"{}", 415, "Content-Type"))
    # The extents route takes a binary extent request (FORMAT.md §16.1), nothing else.
    binary_cases = (("application/json", b'{"x": 1}', 415, "Content-Type"),
                    ("application/octet-stream", b"\xff\xfe", 400, "request body"),
                    ("application/octet-stream", b"CDPQ" + bytes(60), 400, "request body"),
                    ("application/octet-stream", b"[" * 100_000, 400, "request body"))
    for path in posts:
        concrete = path.replace("{name}", "erp").replace("{kind}", "system")
        for ctype, body, expect, field in (binary_cases if path.endswith("/extents") else json_cases):
            status, doc, _ = await raw(api, f"POST {concrete} HTTP/1.1\r\n{host}{auth()}Content-Type: {ctype}", body)
            assert_refusal(api, status, doc, expect=expect, field=field)
        # Hostile path parameters: a 4xx naming the parameter, no path of this machine.
        for name in ("%00", "..", "a" * 300, "%FF", "%C2%B2", "%2E%2E"):
            hostile = path.replace("{name}", name).replace("{kind}", name)
            got, doc, _ = await api.call("POST", hostile, {})
            assert 400 <= got < 500, (hostile, got, doc)
            assert_refusal(api, got, doc, expect=got)
    for method, path, _ in ROUTES:
        if method == "GET" and "{" not in path:
            got, doc, _ = await api.call("GET", path + "?wait=%FF&limit=%00&name=%00")
            assert got < 500, (path, got, doc)
    assert (await api.ok("GET", "/v1/jobs"))["jobs"] == []


@pytest.mark.parametrize("wait", ["%FF", "%C2%B2", "1" * 5000])
async def test_wait_query_is_checked(api, wait):
    got, doc, _ = await api.call("POST", f"/v1/domains/erp/verify?wait={wait}", {})
    assert_refusal(api, got, doc, field="wait")


async def test_a_body_that_never_ends_is_bounded(api):
    """Declared 2 MiB with a 1 MiB limit: 413 at once, naming the body."""
    host = f"Host: {api.site.cfg.api_listen}\r\n"
    status, doc, _ = await raw(api, f"POST /v1/domains/erp/verify HTTP/1.1\r\n{host}{auth()}"
                                    f"Content-Type: application/json\r\nContent-Length: {2 << 20}")
    assert_refusal(api, status, doc, expect=413)


async def test_library_errors_name_no_path_of_this_machine(api):
    """The engine's messages name files for the operator at the console ("no catalog in
    file:///srv/..."); an error answer says the place instead."""
    got, doc, _ = await api.call("GET", "/v1/domains/files/points")
    err = assert_refusal(api, got, doc, expect=404)
    assert "no catalog in <store>" in err["message"], err


async def test_an_encoded_body_is_415_and_a_broken_chunked_one_400(api):
    """A compressed body is refused before aiohttp inflates it (a broken gzip body was a
    500 "internal" with a traceback in the log); the extent route does the same."""
    import gzip
    import zlib

    host = f"Host: {api.site.cfg.api_listen}\r\n"
    for path in ("/v1/domains/erp/verify", "/v1/domains/erp/marks"):
        head = f"POST {path} HTTP/1.1\r\n{host}{auth()}Content-Type: application/json\r\n"
        for encoding, body in (("gzip", gzip.compress(b"{}")), ("deflate", zlib.compress(b"{}"))):
            status, doc, _ = await raw(api, head + f"Content-Encoding: {encoding}", body)
            err = assert_refusal(api, status, doc, expect=415, field="Content-Encoding")
            assert encoding in err["message"], err
        # Broken gzip: aiohttp's parser may refuse it as it arrives (its text 400, §13.5),
        # or the route first; never a 500.
        status, doc, answer = await raw(api, head + "Content-Encoding: gzip", b"abc")
        assert status in (400, 415), answer[:300]
        if status == 415:
            assert_refusal(api, status, doc, expect=415, field="Content-Encoding")
    head = (f"POST /v1/failback/erp/extents HTTP/1.1\r\n{host}{auth()}Content-Type: application/octet-stream\r\n"
            f"Content-Encoding: gzip")
    status, doc, _ = await raw(api, head, gzip.compress(b"x"))
    err = assert_refusal(api, status, doc, expect=415)
    assert "Content-Encoding" in err["message"], err
    head = (f"POST /v1/domains/erp/verify HTTP/1.1\r\n{host}{auth()}Content-Type: application/json\r\n"
            f"Transfer-Encoding: chunked")
    status, doc, _ = await raw(api, head, b"5\r\n{}\r\n")  # says 5 bytes, sends 4, then ends
    assert status in (400, 408), (status, doc)


async def test_a_repeated_key_is_refused_naming_it(api):
    for body, field in (('{"mode": "test", "target": "latest", "mode": "unplanned"}', "mode"),
                        ('{"target": {"seq": 1, "seq": 2}}', "seq")):
        got, doc, _ = await api.call("POST", "/v1/failover/erp", data=body)
        err = assert_refusal(api, got, doc, field=field)
        assert "twice" in err["message"], err
    assert (await api.ok("GET", "/v1/jobs"))["jobs"] == []


async def test_control_characters_of_a_key_are_escaped_in_the_error(api):
    key = "x\x1b[31m\r\nINFO forged\x7f"
    got, doc, _ = await api.call("POST", "/v1/domains/erp/verify", data=json.dumps({key: 1}))
    err = assert_refusal(api, got, doc)
    text = err["field"] + err["message"]
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in text), err
    assert err["field"].startswith("x\\u001b[31m\\r\\nINFO forged\\u007f"), err


async def test_a_head_the_parser_refuses_is_one_log_line(api, caplog):
    """What aiohttp's parser refuses before any route (FORMAT.md §13.5's exception) is
    logged as one warning, without a traceback or the client's bytes."""
    import logging

    host = f"Host: {api.site.cfg.api_listen}\r\n"
    head = f"POST /v1/domains/erp/verify HTTP/1.1\r\n{host}{auth()}Content-Type: application/json\r\n"
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        for extra in ("Content-Encoding: br", "X-Long: " + "SECRETBYTES" * 1000, "Content-Length: -1"):
            status, _, answer = await raw(api, head + extra)
            assert status == 400, answer[:200]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 3, [r.getMessage() for r in records]
    for r in records:
        assert r.levelname == "WARNING" and r.getMessage() == "http_request_refused" and r.exc_info is None, r
        assert r.fields["status"] == 400 and "SECRETBYTES" not in repr(r.fields), r.fields
