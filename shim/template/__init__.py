"""The warm template: one pre-imported process per containerd that forks shims (server.py),
the CPython heap sharing it does before forking (heap.py), and the warm-up run (warmup.py).

Nothing imports this package except the template's own entry point
(shim.launch.template_client.MAIN, run as ``python -c``). Keep this file free of imports.
"""
