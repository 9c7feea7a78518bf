"""husk as an OCI runtime (``husk-runtime``): engines run their containers in husk VMs."""
