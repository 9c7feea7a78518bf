"""husk.cli."""
