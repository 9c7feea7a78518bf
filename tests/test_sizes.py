"""husk.sizes: one parser and validator for a container's memory and CPUs, on every path."""

from __future__ import annotations

import pytest

from husk import sizes
from husk.cli.createopts import build_create_request
from husk.daemon.docker.create_config import spec_from_create
from husk.errors import InvalidArgument
from husk.vm.machine import MIN_MEMORY_MIB


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512m", 512 << 20),
        ("1g", 1 << 30),
        ("1048576", 1 << 20),
        ("2.5k", 2560),
        ("64MiB", 64 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert sizes.parse_size(text) == size


def test_memory_minimum_and_errors() -> None:
    assert sizes.parse_memory("6m") == 6 << 20
    with pytest.raises(InvalidArgument, match="below the minimum of 6MB"):
        sizes.parse_memory("1k")
    with pytest.raises(InvalidArgument, match="below the minimum of 6MB"):
        sizes.parse_memory(1)
    with pytest.raises(InvalidArgument, match="invalid memory '12zz'"):
        sizes.parse_memory("12zz")
    with pytest.raises(InvalidArgument, match="invalid memory: -1"):
        sizes.parse_memory(-1)


@pytest.mark.parametrize("value", [0, -1, "nan", "inf", "lots"])
def test_cpus_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(InvalidArgument, match="--cpus must be"):
        sizes.parse_cpus(value)  # type: ignore[arg-type]


def test_conversions() -> None:
    assert sizes.cpus_to_nanos(1.5) == 1_500_000_000
    assert sizes.nanos_to_cpus(250_000_000) == 0.25
    assert sizes.vm_memory_mib(1) == MIN_MEMORY_MIB == sizes.MIN_VM_MEMORY_MIB
    assert sizes.vm_memory_mib((300 << 20) + 1) == 301
    assert sizes.vm_cpus(0.25) == 1
    assert sizes.vm_cpus(2.5) == 3


def test_the_cli_and_the_api_agree() -> None:
    """The same value is accepted, or refused, by `husk run -m` and by the API's create."""
    request = build_create_request("busybox", (), {"memory": "256m", "cpus": 1.5}, attach=False)
    host = request.body["HostConfig"]
    spec = spec_from_create({"Image": "busybox", "HostConfig": host}, None)
    assert spec.memory == 256 << 20
    assert spec.cpus == 1.5
    with pytest.raises(InvalidArgument, match="below the minimum of 6MB"):
        build_create_request("busybox", (), {"memory": "1k"}, attach=False)
    # The API used to take any byte count, the CLI refused below 6 MB (as Docker does).
    with pytest.raises(InvalidArgument, match="below the minimum of 6MB"):
        spec_from_create({"Image": "busybox", "HostConfig": {"Memory": 1024}}, None)
