"""The guest bundle: an uncompressed vmlinux and an initramfs, built from Debian packages.

``locate()`` is what the VM layer calls; building lives in ``husk.bundle.builder``.
"""

from husk.bundle.locate import Bundle, locate

__all__ = ["Bundle", "locate"]
