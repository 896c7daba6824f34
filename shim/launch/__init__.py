"""The per-start launcher: what runs in a fresh interpreter on every ``start``, ``delete`` and ``-info``.

containerd runs the shim binary once per container start (and ``delete`` after
every shim exit), so this package is on the latency path of every container:
it imports only the standard library and shim.common (plus shim.thp's prctl
and shim.runc_client.config's plain data for ``delete``), never trio or protobuf.
The import-linter contracts in pyproject.toml hold it to that. Keep this file
free of imports: anything here would load on every start.
"""
