"""The VM network's addresses are written once, in husk.guest.netconfig."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from husk.guest import netconfig

SRC = Path(__file__).resolve().parent.parent / "src" / "husk"
ADDRESS = re.compile(r"\b10\.0\.[23]\.\d+")


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are code, not documentation (bare string statements)."""
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
    ]


def test_no_other_module_writes_a_vm_network_address() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == Path(netconfig.__file__).resolve():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _code_strings(tree):
            if ADDRESS.search(node.value):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_the_addresses_are_consistent() -> None:
    import ipaddress

    guest = ipaddress.ip_network(netconfig.GUEST_SUBNET)
    egress = ipaddress.ip_network(netconfig.EGRESS_CIDR)
    assert not guest.overlaps(egress)
    for address in (netconfig.GUEST_ADDRESS, netconfig.GUEST_GATEWAY, netconfig.GUEST_DNS):
        assert ipaddress.ip_address(address) in guest
    for address in (netconfig.EGRESS_GATEWAY, netconfig.EGRESS_DNS):
        assert ipaddress.ip_address(address) in egress
    assert ipaddress.ip_interface(netconfig.GUEST_ADDRESS_CIDR).network == guest
