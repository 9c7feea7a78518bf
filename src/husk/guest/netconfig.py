"""The addresses of every VM's network, known to the host and to the guest agent.

Standard library only (nothing at all, in fact): the guest agent imports it in the VM,
host code imports it as it does :mod:`husk.guest.protocol`.

Each VM has QEMU's user-mode network (slirp) to itself, so every guest has the same
address behind its own NAT. QEMU's slirp sits in the VM's network namespace, where
slirp4netns gives it a tap device on a second private network; see husk.vm.network.
"""

from __future__ import annotations

# -- what the guest sees (QEMU's slirp) ------------------------------------------------
GUEST_SUBNET = "10.0.2.0/24"
GUEST_PREFIX = 24
GUEST_ADDRESS = "10.0.2.15"
GUEST_ADDRESS_CIDR = f"{GUEST_ADDRESS}/{GUEST_PREFIX}"
GUEST_GATEWAY = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
"""slirp's DNS alias: it forwards to the resolver of the VM's namespace (EGRESS_DNS)."""

# -- what QEMU's namespace sees (slirp4netns) ----------------------------------------------
EGRESS_CIDR = "10.0.3.0/24"
"""slirp4netns's network: distinct from the guest's 10.0.2.0/24 (QEMU's slirp)."""
EGRESS_GATEWAY = "10.0.3.2"
EGRESS_DNS = "10.0.3.3"

# -- container networks (husk.network): the VM's LAN interfaces ------------------------
LAN_SLOTS = 4
"""virtio-net devices every VM has besides eth0 (slirp), each one a port on husk's switch.

Always present (templates and the warm pool need one device shape for every network
setup); a slot the container does not use stays down in the guest. It bounds the
networks one container can join at once."""
LAN_MTU = 65520
"""Frames cross the user-space switch whole: large frames mean few of them."""
EMBEDDED_DNS = "127.0.0.11"
"""Where the guest agent answers DNS on user-defined networks (as Docker's resolver does)."""


def lan_boot_mac(slot: int) -> str:
    """The MAC QEMU gives LAN slot ``slot`` (1-based): how the agent finds which NIC is which.

    The guest later sets the endpoint's own MAC; the agent remembers the mapping from boot.
    """
    return f"52:54:00:4c:41:{slot:02x}"
