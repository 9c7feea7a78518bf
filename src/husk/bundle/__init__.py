"""husk.bundle."""
