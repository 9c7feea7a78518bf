"""husk-runtime: husk as an OCI runtime (a runc-compatible command); docs/OCI_RUNTIME.md."""
