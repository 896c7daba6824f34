"""The long-lived shim: one process serving containerd's task API for its group's containers.

Started by the launcher (exec) or forked from the warm template; entry points are in
shim.daemon.main. Everything here may use trio and protobuf. It never imports
shim.launch (the per-start code) nor shim.template. Keep this file free of imports:
the launcher imports shim.common, not this package, but a stray import here would
still load trio wherever a submodule is named.
"""
