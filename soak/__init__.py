"""The soak: Go shim vs this shim under churn, restarts, kills, stuck containers and hostile
clients, in one private containerd, one results table (``python -m soak``, ``make soak``).

Each check lives in a module of its own (churn, restart, kills, stuck, hostile, fuzz, census);
``__main__`` runs them in order and ``report`` turns their rows into the table.
"""
