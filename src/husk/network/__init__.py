"""Container networks: Docker's network model (IPAM, endpoints, names) over a user-space switch.

See docs/NETWORKS.md. Imports only downward (sandbox, vm, agent, base, guest).
"""
