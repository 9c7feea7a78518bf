"""husk.runtime."""
