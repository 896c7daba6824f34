"""Driving runc (or crun) through its command line.

``config`` is importable without trio (the lean ``delete`` path uses it);
``client`` is the async client the shim daemon uses.
"""
