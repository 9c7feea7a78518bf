"""The agent's NETWORK handling (ioctls, no fork) on real interfaces, without a VM.

Runs in a network namespace the test creates (``unshare --net``), on a veth pair whose
first end carries LAN slot 1's boot MAC and whose second end plays eth0 (egress).
Nothing touches the host's own network namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from husk.guest.netconfig import LAN_MTU, lan_boot_mac

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from husk.guest.agent import networking
    from husk.guest.agent.loop import Loop

    networking.EGRESS_INTERFACE = "v1"
    states = json.loads(sys.argv[1])
    net = networking.Networking(Loop())
    net.slots = {1: "v0"}  # what scan() finds in a VM (here /sys is the host's)
    results = []
    for state in states:
        action = state.get("_do")
        try:
            if action == "settle":  # what boot does
                reply = net.settle_lans()
            elif action == "boot_egress":  # the boot-time eth0 setup succeeded
                reply = net.boot_egress(True)
            elif action == "rehearse":  # a warm pool's rehearsal of a start
                # (its /etc/hosts goes to the rehearsal's container root, none here)
                networking.container_root.prepared = lambda: True
                networking.container_root.write_hosts = lambda *args: None
                reply = net.rehearse("box")
            elif action == "workload":  # the agent started the workload
                reply = net.workload_started()
            elif action == "sh":  # a change behind the agent's back
                reply = subprocess.run(["sh", "-ec", state["cmd"]], check=True).returncode
            else:
                reply = net.apply(state)
        except Exception as exc:
            reply = {"error": str(exc)}
        show = lambda *argv: subprocess.run(
            ["ip", *argv], capture_output=True, text=True, check=True
        ).stdout
        results.append({
            "reply": reply,
            "v0": show("-o", "addr", "show", "dev", "v0"),
            "v0_link": show("-o", "link", "show", "dev", "v0"),
            "v1_link": show("-o", "link", "show", "dev", "v1"),
            "routes": show("route", "show", "table", "main"),
            "known": json.loads(json.dumps(net._known)),  # as it is now
        })
    print(json.dumps(results))
    """
)


def apply_states(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    setup = (
        f"ip link add v0 address {lan_boot_mac(1)} type veth peer name v1 "
        f'&& ip link set lo up && exec "$0" -c "$1" "$2"'
    )
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, sys.executable, SCRIPT, json.dumps(states)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr
    results: list[dict[str, Any]] = json.loads(result.stdout)
    return results


def test_a_state_is_applied_and_replaced_idempotently() -> None:
    on = {
        "egress": True,
        "lans": [{"slot": 1, "mac": "02:42:ac:1e:00:02", "address": "172.30.0.2/16", "mtu": 9000}],
        # The container's own subnet is never made unreachable, whatever the list says.
        "unreachable": ["172.31.0.0/16", "172.30.0.0/16", "192.168.16.0/20"],
    }
    moved = {
        "egress": True,
        "lans": [{"slot": 1, "mac": "02:42:ac:1e:00:09", "address": "172.30.0.9/24"}],
        "unreachable": ["172.31.0.0/16"],
    }
    off = {"egress": False, "lans": [], "unreachable": []}
    first, again, second, third = apply_states([on, on, moved, off])

    for state in (first, again):
        assert state["reply"] == {"interfaces": {"1": "v0"}}
        assert "inet 172.30.0.2/16" in state["v0"]
        assert "inet6" not in state["v0"]  # IPv4 networks: no link-local chatter
        assert "02:42:ac:1e:00:02" in state["v0_link"] and "mtu 9000" in state["v0_link"]
        assert ",UP" in state["v0_link"]
        routes = state["routes"]
        assert "unreachable 172.31.0.0/16" in routes
        assert "unreachable 192.168.16.0/20" in routes
        assert "unreachable 172.30.0.0/16" not in routes
        assert "default via 10.0.2.2 dev v1" in routes  # egress: eth0's address and route
        assert routes.count("unreachable") == 2  # the second apply added nothing

    # Another address replaces the first; a route no longer listed goes away.
    assert "inet 172.30.0.9/24" in second["v0"] and "inet 172.30.0.2/" not in second["v0"]
    assert "02:42:ac:1e:00:09" in second["v0_link"]
    assert (
        "192.168.16.0" not in second["routes"] and "unreachable 172.31.0.0/16" in second["routes"]
    )

    # Everything off: the slot loses its address and goes down, so does egress.
    assert "inet " not in third["v0"]
    assert ",UP" not in third["v0_link"] and ",UP" not in third["v1_link"]
    assert "unreachable" not in third["routes"] and "default" not in third["routes"]


def test_a_slot_without_an_interface_is_refused() -> None:
    state = {"lans": [{"slot": 2, "mac": "02:42:ac:1e:00:02", "address": "172.30.0.2/16"}]}
    (result,) = apply_states([state])
    assert "no LAN interface for slot(s) [2]" in result["reply"]["error"]


def test_a_routed_lans_routes_go_through_its_interface_and_follow_the_state() -> None:
    lan = {"slot": 1, "mac": "0a:58:0a:58:00:02", "address": "10.88.0.2/16", "mtu": 1500}
    calico = {
        "egress": False,
        "lans": [
            {
                **lan,
                # The gateway is reachable only through the link route listed after it:
                # link routes go first.
                "routes": [
                    {"destination": "0.0.0.0/0", "gateway": "169.254.1.1"},
                    {"destination": "169.254.1.1/32"},
                    {"destination": "10.99.0.0/24", "gateway": "10.88.0.1"},
                ],
            }
        ],
    }
    plain = {
        "egress": False,
        "lans": [{**lan, "routes": [{"destination": "0.0.0.0/0", "gateway": "10.88.0.1"}]}],
    }
    off = {"egress": True, "lans": []}
    first, again, second, third = apply_states([calico, calico, plain, off])
    for state in (first, again):
        assert state["reply"] == {"interfaces": {"1": "v0"}}, state
        routes = state["routes"]
        assert "default via 169.254.1.1 dev v0" in routes, routes
        assert "169.254.1.1 dev v0 scope link" in routes, routes
        assert "10.99.0.0/24 via 10.88.0.1 dev v0" in routes, routes
        assert routes.count("default") == 1, routes  # egress false: eth0's is gone
    routes = second["routes"]
    assert "default via 10.88.0.1 dev v0" in routes, routes
    assert "169.254.1.1" not in routes and "10.99.0.0" not in routes, routes
    # The LAN unplugged and egress back: the default route is eth0's again.
    assert "v0" not in third["routes"] and "default via 10.0.2.2 dev v1" in third["routes"]


def test_a_start_skips_what_the_agent_set_itself_until_the_workload_runs() -> None:
    """Boot settles the LAN interfaces (down, no IPv6, the LAN MTU) and a start's first
    NETWORK only adds what is the container's own; once the workload runs (it may hold
    CAP_NET_ADMIN) nothing is taken for granted: changes behind the agent's back are
    undone by the next NETWORK."""
    lan = {"slot": 1, "mac": "02:42:ac:11:00:02", "address": "172.17.0.2/16", "mtu": LAN_MTU}
    bridge = {"egress": True, "lans": [lan]}
    boot_script = (
        "ip link set v1 up && ip addr add 10.0.2.15/24 dev v1 && ip route add default via 10.0.2.2"
    )
    behind_its_back = (
        "ip link set v0 down && ip addr flush dev v0 && ip link set v0 mtu 1500 "
        "&& ip link set v0 address 02:00:00:00:00:01 && ip link set v1 down"
    )
    results = apply_states(
        [
            {"_do": "settle"},
            {"_do": "sh", "cmd": boot_script},
            {"_do": "boot_egress"},
            bridge,
            {"_do": "workload"},
            {"_do": "sh", "cmd": behind_its_back},
            bridge,
        ]
    )
    settled, started, changed, again = results[0], results[3], results[5], results[6]
    assert settled["reply"] is None, settled
    assert ",UP" not in settled["v0_link"] and f"mtu {LAN_MTU}" in settled["v0_link"]
    assert "inet" not in settled["v0"]
    for state in (started, again):
        assert state["reply"] == {"interfaces": {"1": "v0"}}, state
        assert "inet 172.17.0.2/16" in state["v0"], state
        assert "inet6" not in state["v0"], state  # IPv6 was turned off at boot
        link = state["v0_link"]
        assert "02:42:ac:11:00:02" in link and f"mtu {LAN_MTU}" in link and ",UP" in link, link
        assert ",UP" in state["v1_link"], state
        assert "default via 10.0.2.2 dev v1" in state["routes"], state
    assert ",UP" not in changed["v0_link"] and "default" not in changed["routes"], changed


def test_a_rehearsal_leaves_the_settled_state_exactly_as_it_found_it() -> None:
    """A warm pool's VM rehearses a default-bridge NETWORK and takes it back: links,
    addresses, routes and the agent's record are as boot left them, and a real start's
    NETWORK then applies its own MAC and address. Only from that settled state."""
    boot_script = (
        "ip link set v1 up && ip addr add 10.0.2.15/24 dev v1 && ip route add default via 10.0.2.2"
    )
    lan = {"slot": 1, "mac": "02:42:ac:11:00:05", "address": "172.17.0.5/16", "mtu": LAN_MTU}
    results = apply_states(
        [
            {"_do": "settle"},
            {"_do": "sh", "cmd": boot_script},
            {"_do": "boot_egress"},
            {"_do": "rehearse"},
            {"egress": True, "lans": [lan]},
            {"_do": "workload"},
            {"_do": "rehearse"},
        ]
    )
    booted, rehearsed, started, refused = results[2], results[3], results[4], results[6]
    assert rehearsed["reply"] is True, rehearsed
    for key in ("v0", "v0_link", "v1_link", "routes", "known"):
        assert rehearsed[key] == booted[key], key
    assert lan_boot_mac(1) in rehearsed["v0_link"] and ",UP" not in rehearsed["v0_link"]
    assert "172.17" not in rehearsed["routes"]  # no address, no gateway route left
    assert started["reply"] == {"interfaces": {"1": "v0"}}, started
    assert "inet 172.17.0.5/16" in started["v0"] and "02:42:ac:11:00:05" in started["v0_link"]
    assert ",UP" in started["v0_link"]
    assert refused["reply"] is False  # once a workload ran, nothing is rehearsed
