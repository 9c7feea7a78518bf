"""The API's TCP listener: never without TLS client certificates (dockerd's --tlsverify).

Whoever reaches the API can create a container with the host's ``/`` bind-mounted,
so ``husk daemon --tcp`` without TLS is refused at startup, and with
``--tlsverify --tlscacert/--tlscert/--tlskey`` only clients holding a certificate
from that CA get an answer. The certificates are made here with ``cryptography``;
the clients are the real docker CLI (``DOCKER_TLS_VERIFY``) and docker-py. No VM.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from daemon_fixtures import RunningDaemon, daemon_env, short_root, start_daemon
from registry_fixtures import free_port

DAEMON_COMMAND = [sys.executable, "-c", "from husk.cli.main import main; main()", "daemon"]
DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"


# ------------------------------------------------------------ certificates


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, cert_name: str, key_name: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / cert_name, directory / key_name
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass
class Pki:
    server_dir: Path  # --tlscacert/--tlscert/--tlskey
    client_dir: Path  # DOCKER_CERT_PATH: ca.pem, cert.pem, key.pem
    stranger_dir: Path  # a client certificate from another CA

    @property
    def daemon_args(self) -> tuple[str, ...]:
        return (
            "--tlsverify",
            "--tlscacert",
            str(self.server_dir / "ca.pem"),
            "--tlscert",
            str(self.server_dir / "server-cert.pem"),
            "--tlskey",
            str(self.server_dir / "server-key.pem"),
        )


def make_pki(root: Path) -> Pki:
    ca = make_ca("husk test CA")
    pki = Pki(root / "server", root / "client", root / "stranger")
    for directory in (pki.server_dir, pki.client_dir):
        directory.mkdir(parents=True)
        (directory / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    issue(ca, "localhost", server=True).write(pki.server_dir, "server-cert.pem", "server-key.pem")
    issue(ca, "client", server=False).write(pki.client_dir, "cert.pem", "key.pem")
    other = make_ca("someone else's CA")
    issue(other, "client", server=False).write(pki.stranger_dir, "cert.pem", "key.pem")
    (pki.stranger_dir / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return pki


# ------------------------------------------------------------------ tests


def test_tcp_without_tls_is_refused_at_startup() -> None:
    """The reproduction: ``--tcp`` alone served anyone reaching the port (host root)."""
    root = short_root()
    try:
        port = free_port()
        result = subprocess.run(
            [*DAEMON_COMMAND, "--tcp", f"127.0.0.1:{port}"],
            env=daemon_env(root),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 125, result
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("husk: refusing to serve the API"), lines
        assert "--tlsverify" in lines[0] and "Traceback" not in result.stderr.decode()
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect(("127.0.0.1", port))  # nothing listens
        assert not (root / "run" / "husk.sock").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_tls_files_that_are_missing_or_wrong_are_named(tmp_path: Path) -> None:
    root = short_root()
    try:
        pki = make_pki(tmp_path)
        port = free_port()
        missing = subprocess.run(
            [
                *DAEMON_COMMAND,
                *("--tcp", f"127.0.0.1:{port}", "--tlsverify"),
                *("--tlscacert", str(tmp_path / "nope.pem")),
                *("--tlscert", str(pki.server_dir / "server-cert.pem")),
                *("--tlskey", str(pki.server_dir / "server-key.pem")),
            ],
            env=daemon_env(root),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert missing.returncode == 125
        assert f"cannot read --tlscacert {tmp_path / 'nope.pem'}" in missing.stderr.decode()
        mismatched = subprocess.run(
            [
                *DAEMON_COMMAND,
                *("--tcp", f"127.0.0.1:{port}", "--tlsverify"),
                *("--tlscacert", str(pki.server_dir / "ca.pem")),
                *("--tlscert", str(pki.server_dir / "server-cert.pem")),
                *("--tlskey", str(pki.client_dir / "key.pem")),
            ],
            env=daemon_env(root),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert mismatched.returncode == 125
        assert "cannot use --tlscert" in mismatched.stderr.decode()
        assert "Traceback" not in mismatched.stderr.decode()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningDaemon, Pki, int]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    root = short_root()
    port = free_port()
    daemon = start_daemon(root, extra_args=("--tcp", f"127.0.0.1:{port}", *pki.daemon_args))
    try:
        yield daemon, pki, port
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_docker_cli_with_docker_tls_verify_is_served(
    tls_daemon: tuple[RunningDaemon, Pki, int],
) -> None:
    daemon, pki, port = tls_daemon
    env = dict(
        daemon.env,
        DOCKER_HOST=f"tcp://127.0.0.1:{port}",
        DOCKER_TLS_VERIFY="1",
        DOCKER_CERT_PATH=str(pki.client_dir),
    )
    result = subprocess.run(
        [DOCKER_CLI, "version", "--format", "{{.Server.APIVersion}}"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"1.50"
    listing = subprocess.run(
        [DOCKER_CLI, "ps", "-a", "-q"], env=env, capture_output=True, timeout=60, check=False
    )
    assert listing.returncode == 0, listing.stderr


@pytest.fixture
def no_ca_bundle_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override docker-py's own CA."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def test_docker_py_with_a_client_certificate_is_served(
    tls_daemon: tuple[RunningDaemon, Pki, int], no_ca_bundle_env: None
) -> None:
    import docker
    from docker.tls import TLSConfig

    _, pki, port = tls_daemon
    tls = TLSConfig(
        client_cert=(str(pki.client_dir / "cert.pem"), str(pki.client_dir / "key.pem")),
        ca_cert=str(pki.client_dir / "ca.pem"),
        verify=True,
    )
    client = docker.DockerClient(base_url=f"https://127.0.0.1:{port}", tls=tls, timeout=60)
    try:
        assert client.ping() is True
        assert client.version()["ApiVersion"] == "1.50"
        assert client.containers.list(all=True) == []
    finally:
        client.close()


def _handshake(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS connection and one request; the daemon's reply (or an exception)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1.45/containers/json HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(4096)


def test_clients_without_a_valid_certificate_get_nothing(
    tls_daemon: tuple[RunningDaemon, Pki, int], no_ca_bundle_env: None
) -> None:
    daemon, pki, port = tls_daemon
    # No certificate at all (the server's own certificate is trusted, so only ours is missing).
    anonymous = ssl.create_default_context(cafile=str(pki.client_dir / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        reply = _handshake(port, anonymous)
        if not reply:  # TLS 1.3: the alert can arrive after the handshake, as an EOF
            raise ConnectionResetError("closed")
    # A certificate from another CA.
    stranger = ssl.create_default_context(cafile=str(pki.stranger_dir / "ca.pem"))
    stranger.load_cert_chain(pki.stranger_dir / "cert.pem", pki.stranger_dir / "key.pem")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        reply = _handshake(port, stranger)
        if not reply:
            raise ConnectionResetError("closed")
    # Plain HTTP to the TLS port.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /v1.45/containers/json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in raw.recv(4096)
    # docker-py without a client certificate.
    import docker
    from docker.tls import TLSConfig

    # (docker-py asks for the version as it is constructed: that request is refused.)
    with pytest.raises(docker.errors.DockerException, match=r"(?i)ssl|certificate|connection"):
        docker.APIClient(
            base_url=f"https://127.0.0.1:{port}",
            tls=TLSConfig(ca_cert=str(pki.client_dir / "ca.pem"), verify=True),
            timeout=30,
        ).containers(all=True)
    assert daemon.alive()
