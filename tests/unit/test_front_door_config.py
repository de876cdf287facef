"""The front door's pieces that run without Docker: nginx/entrypoint.sh (REAL_IP_FROM
rendered into real_ip directives, nginx's stderr filtered) and the services' log
redaction (stream/logs.py and publisher/logs.py are the same file). TLS and HTTP/2
are in test_front_door_tls.py."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from stream import logs

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "nginx" / "entrypoint.sh"
TEMPLATES = ROOT / "nginx" / "templates"

# What the image's entrypoint gets to see: HERALD_REAL_IP and HERALD_CORS_ORIGINS
# on stdout, a line each; its arguments (nginx's error lines, in this test)
# written to stderr.
FAKE_IMAGE_ENTRYPOINT = """#!/bin/sh
printf '%s\\n' "$HERALD_REAL_IP" "$HERALD_CORS_ORIGINS" "$HERALD_STREAM_TARGET" "$HERALD_STREAM_SERVERS"
for line in "$@"; do printf '%s\\n' "$line" >&2; done
"""


def run_entrypoint(
    tmp_path: Path, real_ip_from: str, *stderr_lines: str, cors: str = "", **settings: str
) -> subprocess.CompletedProcess[str]:
    if shutil.which("sed") is None or shutil.which("mkfifo") is None:
        pytest.skip("needs sed and mkfifo")
    fake = tmp_path / "docker-entrypoint.sh"
    fake.write_text(FAKE_IMAGE_ENTRYPOINT)
    fake.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "REAL_IP_FROM": real_ip_from,
        "CORS_ALLOWED_ORIGINS": cors,
        "HERALD_IMAGE_ENTRYPOINT": str(fake),
        **settings,
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *stderr_lines],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("value", "directives"),
    [
        ("", ""),
        (
            "10.0.0.0/8, 172.16.0.0/12 192.168.1.7",
            "set_real_ip_from 10.0.0.0/8; set_real_ip_from 172.16.0.0/12; set_real_ip_from 192.168.1.7; "
            "real_ip_header X-Forwarded-For; real_ip_recursive on;",
        ),
        (
            "2001:db8::/32",
            "set_real_ip_from 2001:db8::/32; real_ip_header X-Forwarded-For; real_ip_recursive on;",
        ),
    ],
)
def test_real_ip_from_becomes_real_ip_directives(tmp_path: Path, value: str, directives: str) -> None:
    result = run_entrypoint(tmp_path, value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == directives


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("", ""),
        (
            "https://app.example.com, http://127.0.0.1:8081 http://[::1]:3000",
            '"https://app.example.com" $http_origin; "http://127.0.0.1:8081" $http_origin; '
            '"http://[::1]:3000" $http_origin; ',
        ),
        ("*", '"~." "*"; '),
    ],
)
def test_cors_allowed_origins_become_map_entries(tmp_path: Path, value: str, entries: str) -> None:
    result = run_entrypoint(tmp_path, "", cors=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[1] == entries


@pytest.mark.parametrize("value", ['https://a.example"; }', "https://a.example/path", "a.example", "null"])
def test_an_origin_nginx_cannot_render_safely_stops_it_from_starting(tmp_path: Path, value: str) -> None:
    result = run_entrypoint(tmp_path, "", cors=value)
    assert result.returncode == 1
    assert "CORS_ALLOWED_ORIGINS" in result.stderr and result.stdout == ""


def test_stream_slots_become_one_unix_server_each(tmp_path: Path) -> None:
    result = run_entrypoint(tmp_path, "", STREAM_SLOTS="3")
    assert result.returncode == 0, result.stderr
    target, servers = result.stdout.split("\n")[2:4]
    assert target == "herald_streams"
    assert servers == "".join(f"server unix:/run/herald/stream-{n}.sock max_fails=0; " for n in (1, 2, 3))
    # The default: 8 slots, the same default as the stream service's (stream/slots.py).
    default = run_entrypoint(tmp_path, "").stdout.split("\n")[3]
    assert default.count("server unix:") == 8 and "stream-8.sock" in default


def test_stream_transport_tcp_names_the_service(tmp_path: Path) -> None:
    domain = "herald.svc.cluster.local"
    result = run_entrypoint(tmp_path, "", STREAM_TRANSPORT="tcp", NGINX_SERVICE_DOMAIN=domain)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[2] == "stream-service.herald.svc.cluster.local:8000"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAM_SLOTS", "0"),
        ("STREAM_SLOTS", "257"),
        ("STREAM_SLOTS", "8;"),
        ("STREAM_SLOTS", "٣"),
        ("STREAM_TRANSPORT", "udp"),
        ("STREAM_TRANSPORT", "unix; deny all"),
    ],
)
def test_a_stream_setting_nginx_cannot_render_stops_it_from_starting(
    tmp_path: Path, name: str, value: str
) -> None:
    result = run_entrypoint(tmp_path, "", **{name: value})
    assert result.returncode == 1
    assert name in result.stderr and result.stdout == ""


@pytest.mark.parametrize("value", ["10.0.0.0/8;", "10.0.0.1; deny all", "*", "proxy.example", "10.0.0.0/8 x"])
def test_a_real_ip_from_that_is_not_an_address_stops_nginx_from_starting(tmp_path: Path, value: str) -> None:
    result = run_entrypoint(tmp_path, value)
    assert result.returncode == 1
    assert "REAL_IP_FROM" in result.stderr and result.stdout == ""


def test_nginx_error_lines_lose_their_query_strings(tmp_path: Path) -> None:
    prefix = (
        '2026/12/04 16:46:31 [warn] 38#38: *11 limiting connections by zone "z", client: 1.2.3.4, server: _, '
    )
    lines = [
        prefix + 'request: "GET /stream?channel=a&token=S1&token=S2 HTTP/1.1", host: "h"',
        prefix
        + 'request: "GET /stream?%74oken=S3 HTTP/1.1", upstream: "http://10.0.0.4:8000/stream?%74oken=S3", '
        'host: "h", referrer: "http://page/?token=S4"',
        # A quote or a space inside the query: the line loses all after its first '?'.
        prefix + 'request: "GET /stream?a="&TO%6BEN=S5 HTTP/1.1", host: "h"',
        prefix + 'request: "GET /stream?a=1 x&t%6Fken=S6 HTTP/1.1"',
        "nginx: [notice] signal process started",
        # An empty stream slot, refused and skipped (nginx then tries the next): dropped.
        "2026/12/04 16:46:31 [error] 38#38: *12 connect() to unix:/run/herald/stream-4.sock failed "
        "(2: No such file or directory) while connecting to upstream, client: 1.2.3.4, server: _",
        "2026/12/04 16:46:31 [error] 38#38: *13 connect() to unix:/run/herald/stream-2.sock failed "
        "(111: Connection refused) while connecting to upstream, client: 1.2.3.4, server: _",
        # Kept: every other upstream failure, and a slot that failed otherwise.
        "2026/12/04 16:46:31 [error] 38#38: *14 no live upstreams while connecting to upstream",
        "2026/12/04 16:46:31 [error] 38#38: *15 connect() to unix:/run/herald/stream-1.sock failed "
        "(13: Permission denied) while connecting to upstream",
        "2026/12/04 16:46:31 [warn] 38#38: *16 upstream server temporarily disabled while reading response "
        'header from upstream, upstream: "http://unix:/run/herald/stream-1.sock:/stream"',
    ]
    result = run_entrypoint(tmp_path, "", *lines)
    assert result.returncode == 0
    out = result.stderr.splitlines()
    assert out == [
        prefix + 'request: "GET /stream?[redacted] HTTP/1.1", host: "h"',
        prefix
        + 'request: "GET /stream?[redacted] HTTP/1.1", upstream: "http://10.0.0.4:8000/stream?[redacted]", '
        'host: "h", referrer: "http://page/?[redacted]"',
        prefix + 'request: "GET /stream?[redacted]',
        prefix + 'request: "GET /stream?[redacted]',
        "nginx: [notice] signal process started",
        *lines[-3:],
    ]


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("GET /stream?channel=a&token=S1 HTTP/1.1", "GET /stream?channel=a&token=[redacted] HTTP/1.1"),
        ("/stream?token=S1&token=S2", "/stream?token=[redacted]&token=[redacted]"),
        (
            "/s?%74oken=S1&TO%6BEN=S2&to%6ben=S3",
            "/s?%74oken=[redacted]&TO%6BEN=[redacted]&to%6ben=[redacted]",
        ),
        ("'GET /stream?token=S1\"x&a=1 HTTP/1.1'", "'GET /stream?token=[redacted]&a=1 HTTP/1.1'"),
        ("no token here: channel=a", "no token here: channel=a"),
    ],
)
def test_the_services_redact_token_parameters(text: str, redacted: str) -> None:
    assert logs.redact(text) == redacted


def test_the_services_log_filter_redacts_messages_and_tracebacks() -> None:
    try:
        raise ValueError("bad /stream?token=S2")
    except ValueError as exc:
        record = logging.LogRecord(
            "gunicorn.error", logging.ERROR, __file__, 1, "Error handling request %s", ("/stream?token=S1",),
            (type(exc), exc, exc.__traceback__),
        )  # fmt: skip
    assert logs.RedactFilter().filter(record)
    assert record.getMessage() == "Error handling request /stream?token=[redacted]"
    assert record.exc_info is None and record.exc_text is not None
    assert "token=[redacted]" in record.exc_text and "S2" not in record.exc_text


# --- TLS and HTTP/2 (docs/tls.md) ------------------------------------------------

# What the image's entrypoint gets to see, all of it: the environment the
# templates are rendered with (envsubst, defined variables only, as the
# official image and the local stand-in do).
