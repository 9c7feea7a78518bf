"""Registry client details: plain-HTTP rules, credential sources, retries, realms."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from husk.errors import InvalidArgument, NotFound, PullFailed
from husk.oci.auth import (
    Challenge,
    Credentials,
    lookup_credentials,
    registry_key,
    remove_credentials,
    store_credentials,
)
from husk.oci.pull import pull
from husk.oci.regconfig import allows_plain_http, is_loopback
from husk.oci.registry import RegistryClient, RegistryError
from husk.oci.store import ImageStore
from registry_fixtures import FaultProxy, RunningRegistry, registry  # noqa: F401 - fixtures
from testimages import small_image_layout


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.delenv("HUSK_INSECURE_REGISTRIES", raising=False)


def test_plain_http_only_for_loopback_and_listed_registries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for host in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000"):
        assert is_loopback(host) and allows_plain_http(host), host
    for host in ("10.0.0.1:5000", "registry.example.com", "docker.io", "localhost.example.com"):
        assert not allows_plain_http(host), host
    monkeypatch.setenv("HUSK_INSECURE_REGISTRIES", "10.0.0.1:5000, insecure.example")
    assert allows_plain_http("10.0.0.1:5000")
    assert not allows_plain_http("10.0.0.1:6000")
    assert allows_plain_http("insecure.example:443")
    monkeypatch.delenv("HUSK_INSECURE_REGISTRIES")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "registries.json").write_text(
        json.dumps({"insecure-registries": ["lab.example:5000"]})
    )
    assert allows_plain_http("lab.example:5000")
    (tmp_path / "data" / "registries.json").write_text("{broken")
    with pytest.raises(InvalidArgument, match=r"registries\.json"):
        allows_plain_http("lab.example:5000")


def test_secure_registries_use_https_without_probing() -> None:
    async def base() -> tuple[str, str]:
        async with (
            RegistryClient("registry.example.com") as client,
            RegistryClient("docker.io") as hub,
        ):
            return await client.base_url(), await hub.base_url()

    assert asyncio.run(base()) == ("https://registry.example.com", "https://registry-1.docker.io")


def test_token_realm_over_plain_http_elsewhere_is_refused() -> None:
    challenge = Challenge("bearer", (("realm", "http://10.1.2.3/token"), ("service", "s")))

    async def fetch() -> None:
        async with RegistryClient("registry.example.com") as client:
            await client._fetch_token("repository:a:pull", challenge)

    with pytest.raises(RegistryError, match="refusing to send credentials unencrypted"):
        asyncio.run(fetch())


def test_credential_sources(tmp_path: Path) -> None:
    assert registry_key("https://index.docker.io/v1/") == "docker.io"
    assert registry_key("http://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    hub = base64.b64encode(b"hubuser:hubpass").decode()
    (docker_dir / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": hub},
                    "reg.example": {"identitytoken": "refresh-me"},
                    "broken.example": {"auth": "***"},
                }
            }
        )
    )
    assert lookup_credentials("docker.io") == Credentials("hubuser", "hubpass")
    assert lookup_credentials("reg.example") == Credentials(identity_token="refresh-me")
    assert lookup_credentials("other.example") is None
    with pytest.raises(InvalidArgument, match="not valid base64"):
        lookup_credentials("broken.example")
    # husk's own store wins over Docker's.
    store_credentials("docker.io", "mine", "secret")
    assert lookup_credentials("index.docker.io") == Credentials("mine", "secret")
    assert remove_credentials("https://index.docker.io/v1/")
    assert lookup_credentials("docker.io") == Credentials("hubuser", "hubpass")
    with pytest.raises(InvalidArgument, match="':'"):
        store_credentials("x.example", "a:b", "c")


@pytest.mark.registry
def test_transient_errors_are_retried(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = registry.push_oci_layout(small_image_layout(tmp_path / "l", "retry"), "retry/img:v1")
    info = registry.inspect("retry/img:v1")
    store = ImageStore()
    with FaultProxy(registry) as proxy:
        proxy.faults["v1"] = "503-once"
        proxy.faults[info["Layers"][0]] = "503-once"
        record = asyncio.run(pull(ref.replace(registry.host, proxy.host), store=store))
        statuses = [path for method, path, _ in proxy.requests if path.endswith("/v1")]
    assert record.manifest_digest == info["Digest"]
    assert len(statuses) == 2  # the 503, then the retry

    def no_retries(domain: str) -> RegistryClient:
        return RegistryClient(domain, retries=1)

    with FaultProxy(registry) as proxy:
        proxy.faults["v1"] = "503-once"
        with pytest.raises(PullFailed, match="HTTP 503"):
            asyncio.run(
                pull(
                    ref.replace(registry.host, proxy.host),
                    store=ImageStore(tmp_path / "other"),
                    client_factory=no_retries,
                )
            )


@pytest.mark.registry
def test_localhost_name_and_platform_mismatch(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    registry.push_oci_layout(small_image_layout(tmp_path / "l", "localhost"), "local/img:v1")
    ref = f"localhost:{registry.port}/local/img:v1"
    store = ImageStore()
    record = asyncio.run(pull(ref, store=store))
    assert record.names == (ref,)
    with pytest.raises(NotFound, match="not for the requested linux/arm64"):
        asyncio.run(pull(ref, store=store, platform="linux/arm64", policy="always"))
