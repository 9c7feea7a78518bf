"""husk: OCI containers, each in its own lightweight Linux VM.

Deliberately empty of imports: the guest agent imports ``husk.guest`` on a bare
CPython where every import costs boot time.
"""

__version__ = "0.1.0"
