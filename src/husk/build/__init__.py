"""Image builds: Dockerfiles, their executor and build cache (``husk build``, ``POST /build``)."""
