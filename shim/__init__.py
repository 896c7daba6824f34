"""containerd-shim-runc-v2-py: a containerd shim v2 for runc, written in Python."""

__version__ = "0.1.0"
