"""husk's client of its daemon: a small Docker Engine API client over a unix socket.

Standard library only, and cheap to import: every ``husk`` command that talks
to the daemon pays for this package on each invocation.
"""
