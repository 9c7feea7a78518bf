"""Code that runs inside the guest VM. Standard library only."""
