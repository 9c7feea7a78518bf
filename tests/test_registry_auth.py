"""Authentication against real registries: htpasswd basic auth and JWT bearer tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from husk.errors import PullFailed
from husk.oci.archive import load_path
from husk.oci.auth import Credentials, lookup_credentials, parse_challenge
from husk.oci.pull import pull
from husk.oci.push import push
from husk.oci.registry import RegistryClient
from husk.oci.store import ImageStore
from registry_fixtures import (  # noqa: F401 - fixtures
    PASSWORD,
    USERNAME,
    RunningRegistry,
    auth_registry,
    token_registry,
)
from testimages import multilayer_image_layout, small_image_layout

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


def husk(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )


def _with_credentials(domain: str) -> RegistryClient:
    return RegistryClient(domain, credentials=Credentials(USERNAME, PASSWORD))


def test_challenge_parsing() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.get("realm") == "https://auth.example/token"
    assert challenge.get("scope") == "repository:a/b:pull,push"
    assert parse_challenge('Basic realm="x \\"y\\""').get("realm") == 'x "y"'


def test_basic_auth_login_pull_logout(
    auth_registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    store: ImageStore,
) -> None:
    ref = auth_registry.push_oci_layout(small_image_layout(tmp_path / "l", "basic"), "auth/img:v1")
    with pytest.raises(
        PullFailed, match=f"authentication required; run 'husk login {auth_registry.host}'"
    ):
        asyncio.run(pull(ref, store=store))
    assert store.list_images() == []

    wrong = husk("login", "-u", USERNAME, "--password-stdin", auth_registry.host, stdin="nope\n")
    assert wrong.returncode == 125
    assert wrong.stderr.startswith("husk: ") and "authentication failed for 'husk'" in wrong.stderr
    assert lookup_credentials(auth_registry.host) is None

    ok = husk(
        "login", "-u", USERNAME, "--password-stdin", auth_registry.host, stdin=PASSWORD + "\n"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Login Succeeded")
    auth_file = tmp_path / "data" / "auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert PASSWORD not in auth_file.read_text()  # base64, like Docker; never plain
    assert lookup_credentials(auth_registry.host) == Credentials(USERNAME, PASSWORD)

    record = asyncio.run(pull(ref, store=store))
    assert record.manifest_digest == auth_registry.manifest_digest("auth/img:v1")

    assert husk("logout", auth_registry.host).stdout.strip() == (
        f"Removing login credentials for {auth_registry.host}"
    )
    assert lookup_credentials(auth_registry.host) is None
    assert (
        husk("logout", auth_registry.host).stdout.strip()
        == f"Not logged in to {auth_registry.host}"
    )


def test_docker_config_auths_and_credential_helper(
    auth_registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    store: ImageStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = auth_registry.push_oci_layout(small_image_layout(tmp_path / "l", "cfg"), "auth/cfg:v1")
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    encoded = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    (docker_dir / "config.json").write_text(
        json.dumps({"auths": {f"http://{auth_registry.host}/v2/": {"auth": encoded}}})
    )
    assert asyncio.run(pull(ref, store=store)).names == (ref,)

    # A credential helper: the Docker protocol, 'get' with the server on stdin.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "helper.log"
    helper = bin_dir / "docker-credential-husktest"
    helper.write_text(
        "#!/bin/sh\n"
        f'read server; echo "$1 $server" >> {log}\n'
        f'printf \'{{"ServerURL":"%s","Username":"{USERNAME}","Secret":"{PASSWORD}"}}\' "$server"\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (docker_dir / "config.json").write_text(
        json.dumps({"credHelpers": {auth_registry.host: "husktest"}})
    )
    record = asyncio.run(pull(ref, store=store, policy="always"))
    assert record.manifest_digest == auth_registry.manifest_digest("auth/cfg:v1")
    assert log.read_text().split() == ["get", auth_registry.host]

    (docker_dir / "config.json").write_text(json.dumps({"credsStore": "missing-helper"}))
    with pytest.raises(PullFailed, match=r"docker-credential-missing-helper .*not installed"):
        asyncio.run(pull(ref, store=store, policy="always"))


def test_token_auth_anonymous_and_authenticated(
    token_registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    store: ImageStore,
) -> None:
    issuer = token_registry.token_issuer
    assert issuer is not None
    layout = multilayer_image_layout(tmp_path / "ml")
    public = token_registry.push_oci_layout(layout, "public/multilayer:v1")
    private = token_registry.push_oci_layout(layout, "private/multilayer:v1")

    issuer.requests.clear()
    record = asyncio.run(pull(public, store=store))
    assert len(record.layers) == 4
    # One token for the repository, cached for the manifest, the config and all layers.
    assert issuer.requests == [{"user": None, "scopes": ["repository:public/multilayer:pull"]}]

    with pytest.raises(PullFailed, match="private/multilayer"):
        asyncio.run(pull(private, store=store))

    issuer.requests.clear()
    record = asyncio.run(pull(private, store=store, client_factory=_with_credentials))
    assert record.id == store.resolve(public).id
    assert issuer.requests == [{"user": USERNAME, "scopes": ["repository:private/multilayer:pull"]}]

    def wrong_password(domain: str) -> RegistryClient:
        return RegistryClient(domain, credentials=Credentials(USERNAME, "wrong"))

    with pytest.raises(PullFailed, match=r"authentication to .* failed as 'husk'"):
        asyncio.run(pull(private, store=store, client_factory=wrong_password, policy="always"))


def test_token_auth_push_and_login(
    token_registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    store: ImageStore,
) -> None:
    record = load_path(small_image_layout(tmp_path / "l", "tok"), store=store, name="x/tok")[0]
    target = f"{token_registry.host}/private/pushed:v1"
    with pytest.raises(PullFailed, match="private/pushed"):
        asyncio.run(push("x/tok", destination=target, store=store))
    result = asyncio.run(
        push("x/tok", destination=target, store=store, client_factory=_with_credentials)
    )
    assert result.digest == record.manifest_digest
    assert token_registry.inspect("private/pushed:v1")["Digest"] == record.manifest_digest

    bad = husk("login", "-u", USERNAME, "-p", "wrong", token_registry.host)
    assert bad.returncode == 125 and "authentication to" in bad.stderr
    good = husk("login", "-u", USERNAME, "-p", PASSWORD, token_registry.host)
    assert good.returncode == 0, good.stderr
    # Stored credentials are used without a client factory.
    pulled = asyncio.run(pull(target, store=ImageStore(tmp_path / "fresh")))
    assert pulled.manifest_digest == record.manifest_digest
