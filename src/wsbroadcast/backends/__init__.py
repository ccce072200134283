"""Backends, each imported lazily by :func:`wsbroadcast.backend_from_url` from its URL scheme."""
