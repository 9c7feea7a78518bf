"""husk.daemon."""
