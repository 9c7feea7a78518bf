"""husk.vm."""
