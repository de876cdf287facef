"""The front door's TLS and HTTP/2 without Docker (docs/tls.md): nginx/entrypoint.sh
run as compose.yaml's nginx service would run it, with and without a certificate,
the rendered configuration checked by nginx itself when it is installed, and
scripts/dev-cert.sh."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "nginx" / "entrypoint.sh"
TEMPLATES = ROOT / "nginx" / "templates"
DEV_CERT = ROOT / "scripts" / "dev-cert.sh"


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
