"""The front door's pieces that run without Docker: nginx/entrypoint.sh (REAL_IP_FROM
rendered into real_ip directives, nginx's stderr filtered, TLS and HTTP/2 rendered
or not), the rendered configuration checked by nginx itself when it is installed,
scripts/dev-cert.sh, and the services' log redaction (stream/logs.py and
publisher/logs.py are the same file)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from stream import logs

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "nginx" / "entrypoint.sh"
TEMPLATES = ROOT / "nginx" / "templates"
DEV_CERT = ROOT / "scripts" / "dev-cert.sh"

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
ENV_DUMP_ENTRYPOINT = """#!/bin/sh
env -0 >"$HERALD_TEST_ENV_OUT"
"""


def nginx_defaults() -> dict[str, str]:
    """The nginx service's environment in compose.yaml, with every default taken."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    settings: dict[str, str] = {}
    for name, value in compose["services"]["nginx"]["environment"].items():
        match = re.fullmatch(r"\$\{[A-Z_0-9]+:?-(.*)\}", str(value))
        assert match, f"compose.yaml: nginx's {name} has no default"
        settings[name] = match.group(1)
    return settings


def fake_nginx(bin_dir: Path, version: str) -> None:
    """An `nginx` on PATH that only answers `nginx -v`, as nginx does (on stderr)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nginx"
    script.write_text(f"#!/bin/sh\necho 'nginx version: nginx/{version}' >&2\n")
    script.chmod(0o755)


def tls_files(directory: Path, cert: str | None = "CERT", key: str | None = "KEY") -> Path:
    """A directory like the container's /etc/nginx/tls: each file with the text
    given, or /dev/null (what compose.yaml mounts for an unset setting) for None."""
    directory.mkdir(exist_ok=True)
    for name, text in (("cert.pem", cert), ("key.pem", key)):
        if text is None:
            (directory / name).symlink_to("/dev/null")
        else:
            (directory / name).write_text(text)
    return directory


class Rendered:
    """The entrypoint's run and, if it got as far, the templates as rendered."""

    def __init__(self, result: subprocess.CompletedProcess[str], env: dict[str, str]) -> None:
        self.result = result
        self.env = env
        self.files = {
            t.name.removesuffix(".template"): envsubst(t.read_text(), env)
            for t in TEMPLATES.glob("*.template")
        }

    @property
    def conf(self) -> str:
        return self.files["herald.conf"]

    def server(self) -> str:
        """The server block's directives before its first location, without comments."""
        start = self.conf.index("\nserver {")
        block = self.conf[start : self.conf.index("location ", start)]
        return "\n".join(line for line in block.splitlines() if not line.strip().startswith("#"))


def envsubst(text: str, env: dict[str, str]) -> str:
    """envsubst with the list of defined variables: ${NAME} and $NAME of those only."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return env[name] if name in env else match.group(0)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, text)


def render(
    tmp_path: Path, tls_dir: Path | None = None, nginx_version: str = "1.28.0", **settings: str
) -> Rendered:
    """Run nginx/entrypoint.sh as the nginx service of compose.yaml would (its
    defaults, then `settings`), with TLS files from `tls_dir` (default: none)
    and an nginx of `nginx_version` (or the real one on PATH: "installed")."""
    if shutil.which("sed") is None or shutil.which("mkfifo") is None:
        pytest.skip("needs sed and mkfifo")
    fake = tmp_path / "docker-entrypoint.sh"
    fake.write_text(ENV_DUMP_ENTRYPOINT)
    fake.chmod(0o755)
    path = "/usr/bin:/bin"
    if nginx_version == "installed":
        path = f"{Path(installed_nginx()).parent}:{path}"
    else:
        fake_nginx(tmp_path / "bin", nginx_version)
        path = f"{tmp_path / 'bin'}:{path}"
    out = tmp_path / "env.out"
    out.unlink(missing_ok=True)
    env = {
        **nginx_defaults(),
        "PATH": path,
        "HERALD_IMAGE_ENTRYPOINT": str(fake),
        "HERALD_TEST_ENV_OUT": str(out),
        "HERALD_TLS_DIR": str(tls_dir or tmp_path / "no-tls"),
        **settings,
    }
    result = subprocess.run(
        ["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    rendered: dict[str, str] = {}
    if out.exists():
        for entry in out.read_text().split("\0"):
            name, _, value = entry.partition("=")
            if name:
                rendered[name] = value
    return Rendered(result, rendered)


def installed_nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nginx is not installed")
    return found


def test_without_a_certificate_the_front_door_is_plain_http_only(tmp_path: Path) -> None:
    # No files at all (Kubernetes, any image run without the mounts), and
    # /dev/null for both (compose.yaml with TLS_CERT_FILE and TLS_KEY_FILE unset).
    for tls_dir in (None, tls_files(tmp_path / "devnull", cert=None, key=None)):
        rendered = render(tmp_path, tls_dir, TLS_REDIRECT="true")
        assert rendered.result.returncode == 0, rendered.result.stderr
        assert rendered.env["HERALD_TLS_LISTEN"] == rendered.env["HERALD_TLS_REDIRECT"] == ""
        assert rendered.env["HERALD_HSTS"] == ""
        server = rendered.server()
        assert re.findall(r"^\s*listen .*$", server, re.M) == ["    listen 80 default_server;"]
        for word in ("ssl", "http2", "herald-tls.inc", "return 308"):
            assert word not in server
        # The redirect asked for is ignored, and said so.
        assert "TLS_REDIRECT=true is ignored" in rendered.result.stderr
        assert 'on "";' in rendered.conf  # no HSTS value


@pytest.mark.parametrize(
    ("version", "listen"),
    [
        # The local stand-in (Debian bookworm) and anything before 1.25.1: the listen's parameter.
        ("1.22.1", ["listen 80 default_server;", "listen 443 ssl http2 default_server;"]),
        ("1.25.0", ["listen 80 default_server;", "listen 443 ssl http2 default_server;"]),
        # From 1.25.1 (the official image): `http2 on;`, the parameter is deprecated.
        ("1.25.1", ["listen 80 default_server;", "listen 443 ssl default_server;", "http2 on;"]),
        ("1.28.0", ["listen 80 default_server;", "listen 443 ssl default_server;", "http2 on;"]),
        ("2.0.0", ["listen 80 default_server;", "listen 443 ssl default_server;", "http2 on;"]),
    ],
)
def test_with_a_certificate_one_server_listens_on_both_with_http2_over_tls(
    tmp_path: Path, version: str, listen: list[str]
) -> None:
    rendered = render(tmp_path, tls_files(tmp_path / "tls"), nginx_version=version)
    assert rendered.result.returncode == 0, rendered.result.stderr
    server = rendered.server()
    directives = re.findall(r"(?<![\w$])(?:listen|http2) [^;]*;", server)
    assert directives == listen
    # One server block for both listeners: the same locations, limits and errors.
    assert rendered.conf.count("\nserver {") == 1
    assert "include /etc/nginx/conf.d/herald-tls.inc;" in server
    assert "return 308" not in server  # no redirect unless asked for


def test_the_tls_settings_are_modern_only(tmp_path: Path) -> None:
    tls_dir = tls_files(tmp_path / "tls")
    rendered = render(tmp_path, tls_dir)
    assert rendered.result.returncode == 0, rendered.result.stderr
    inc = rendered.files["herald-tls.inc"]
    directives = dict(
        line.rstrip(";").split(None, 1) for line in inc.splitlines() if line and not line.startswith("#")
    )
    assert directives["ssl_certificate"] == f"{tls_dir}/cert.pem"
    assert directives["ssl_certificate_key"] == f"{tls_dir}/key.pem"
    assert directives["ssl_protocols"] == "TLSv1.2 TLSv1.3"
    ciphers = directives["ssl_ciphers"].split(":")
    assert ciphers and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)
    assert directives["ssl_session_tickets"] == "off"
    assert directives["ssl_session_cache"].startswith("shared:")


@pytest.mark.parametrize(
    ("port", "target"), [("8443", "https://$host:8443$request_uri"), ("443", "https://$host$request_uri")]
)
def test_tls_redirect_sends_plain_http_to_https_with_hsts(tmp_path: Path, port: str, target: str) -> None:
    rendered = render(tmp_path, tls_files(tmp_path / "tls"), TLS_REDIRECT="true", HERALD_TLS_PORT=port)
    assert rendered.result.returncode == 0, rendered.result.stderr
    assert f"if ($herald_to_https) {{ return 308 {target}; }}" in rendered.server()
    assert 'on "max-age=63072000";' in rendered.conf
    # The map that picks what is redirected: plain HTTP, but for the health
    # check and nginx's own error pages.
    map_block = rendered.conf[rendered.conf.index('map "$https:$uri" $herald_to_https') :]
    map_block = map_block[: map_block.index("}")]
    assert '":/healthz" "";' in map_block and '"~^:/_herald/" "";' in map_block and '"~^:" 1;' in map_block
    # Every add_header list repeats the HSTS header (a location's add_header hides the server's).
    conf = rendered.conf
    assert conf.count("add_header Strict-Transport-Security $herald_hsts always;") == 2
    assert (
        "add_header Strict-Transport-Security $herald_hsts always;" in rendered.files["herald-error-cors.inc"]
    )


@pytest.mark.parametrize(
    ("files", "settings", "message"),
    [
        ({"cert": "CERT", "key": None}, {}, "no key"),
        ({"cert": None, "key": "KEY"}, {}, "no certificate"),
        ({"cert": None, "key": None}, {"HERALD_TLS": "on"}, "HERALD_TLS=on"),
        ({}, {"HERALD_TLS": "yes"}, "HERALD_TLS"),
        ({}, {"TLS_REDIRECT": "1"}, "TLS_REDIRECT"),
        ({}, {"HERALD_TLS_PORT": "0"}, "HERALD_TLS_PORT"),
        ({}, {"HERALD_TLS_PORT": "65536"}, "HERALD_TLS_PORT"),
        ({}, {"HERALD_TLS_PORT": "8443; return 200"}, "HERALD_TLS_PORT"),
    ],
)
def test_a_tls_setting_nginx_cannot_use_stops_it_from_starting(
    tmp_path: Path, files: dict[str, str | None], settings: dict[str, str], message: str
) -> None:
    tls_dir = tls_files(tmp_path / "tls", **files) if files else tls_files(tmp_path / "tls")
    rendered = render(tmp_path, tls_dir, **settings)
    assert rendered.result.returncode == 1
    assert message in rendered.result.stderr and rendered.env == {}


def test_a_mount_source_that_does_not_exist_is_named(tmp_path: Path) -> None:
    """Docker makes a directory for a bind mount whose source is missing."""
    tls_dir = tmp_path / "tls"
    (tls_dir / "cert.pem").mkdir(parents=True)
    (tls_dir / "key.pem").write_text("KEY")
    rendered = render(tmp_path, tls_dir)
    assert rendered.result.returncode == 1
    assert "is a directory" in rendered.result.stderr and "TLS_CERT_FILE" in rendered.result.stderr


def test_herald_tls_off_ignores_a_certificate(tmp_path: Path) -> None:
    rendered = render(tmp_path, tls_files(tmp_path / "tls"), HERALD_TLS="off")
    assert rendered.result.returncode == 0, rendered.result.stderr
    assert rendered.env["HERALD_TLS_LISTEN"] == ""


def test_every_location_that_proxies_refuses_a_uri_the_services_would_not_take(tmp_path: Path) -> None:
    """gunicorn answers a request line over 4094 bytes with an HTML 414; over
    HTTP/2 nginx's own limit sees the URI compressed. nginx answers its JSON
    414 first, in every location that proxies to a service."""
    rendered = render(tmp_path)
    assert rendered.result.returncode == 0, rendered.result.stderr
    blocks = re.split(r"\n    location ", rendered.conf)[1:]
    proxied = [block for block in blocks if "proxy_pass" in block]
    assert len(proxied) == 5, [block.split("{")[0] for block in proxied]
    for block in proxied:
        assert "if ($herald_uri_too_long) {\n            return 414;" in block, block.split("{")[0]
    limit = re.search(r'"~\^\.\{(\d+)\}" 1;', rendered.conf)
    assert limit is not None
    # The longest URI the services take with each method they answer (OPTIONS the longest).
    assert int(limit.group(1)) == 4094 - len("OPTIONS  HTTP/1.1") + 1


def dev_cert(directory: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    return subprocess.run(
        ["sh", str(DEV_CERT), str(directory)], capture_output=True, text=True, timeout=60, check=False
    )


def test_dev_cert_makes_a_ca_and_a_localhost_certificate_once(tmp_path: Path) -> None:
    directory = tmp_path / "dev-cert"
    first = dev_cert(directory)
    assert first.returncode == 0, first.stderr
    # The settings to put in .env, as absolute paths.
    assert f"TLS_CERT_FILE={directory}/cert.pem" in first.stdout.splitlines()
    assert f"TLS_KEY_FILE={directory}/key.pem" in first.stdout.splitlines()
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(directory / "ca.pem"), str(directory / "cert.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(directory / "cert.pem"), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert oct((directory / "key.pem").stat().st_mode & 0o777) == "0o600"
    assert not (directory / "ca-key.pem").stat().st_mode & 0o077
    # Idempotent: a second run keeps the CA and the certificate.
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    again = dev_cert(directory)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
    assert again.stdout == first.stdout


def nginx_test_config(tmp_path: Path, rendered: Rendered) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the rendered configuration, its paths moved into tmp_path."""
    nginx = installed_nginx()
    if not Path("/etc/nginx/mime.types").exists():
        pytest.skip("nginx's mime.types is not installed")
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir(exist_ok=True)

    def local(text: str) -> str:
        text = text.replace("/etc/nginx/conf.d/", f"{conf_d}/")
        text = text.replace("/var/log/nginx/access.log", str(tmp_path / "access.log"))
        # nginx -t resolves the upstream's name (the services' do not exist here).
        return text.replace("server publisher-service:8000", "server 127.0.0.1:8000")

    for name, text in rendered.files.items():
        (conf_d / name).write_text(local(text))
    main = local((ROOT / "nginx" / "nginx.conf").read_text())
    main = main.replace("user nginx;", "").replace("/run/nginx.pid", str(tmp_path / "nginx.pid"))
    (tmp_path / "nginx.conf").write_text(main)
    return subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("settings", [{}, {"TLS": "on"}, {"TLS": "on", "TLS_REDIRECT": "true"}])
def test_the_installed_nginx_accepts_the_rendered_configuration(
    tmp_path: Path, settings: dict[str, str]
) -> None:
    """With and without TLS, in the syntax the installed nginx's version calls for."""
    tls_dir = None
    if settings.pop("TLS", None):
        tls_dir = tmp_path / "tls"
        made = dev_cert(tls_dir)
        assert made.returncode == 0, made.stderr
    rendered = render(tmp_path, tls_dir, nginx_version="installed", NGINX_UPSTREAM_RESOLVE="", **settings)
    assert rendered.result.returncode == 0, rendered.result.stderr
    assert ("ssl" in rendered.env["HERALD_TLS_LISTEN"]) == (tls_dir is not None)
    checked = nginx_test_config(tmp_path, rendered)
    assert checked.returncode == 0, checked.stderr
