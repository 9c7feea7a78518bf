"""Volumes: named and anonymous volumes (the ``local`` driver) and mount specifications.

See docs/VOLUMES.md. Imports only downward (sandbox, vm, agent, oci, base, guest).
"""
