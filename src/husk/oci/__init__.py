"""husk.oci."""
