"""The long-lived shim: one process serving containerd's task API for its group's containers.

Started by the launcher (exec) or forked from the warm template; entry points are in
shim.daemon.main. Everything here may use trio and protobuf. It never imports
shim.launch (the per-start code) nor shim.template. Keep this file free of other imports:
the launcher imports shim.common, not this package, but a stray import here would
still load trio wherever a submodule is named.

The one thing done here, before any submodule imports trio: OpenSSL's modules, which
trio imports and a shim never uses, are deferred (shim.common.deferred: ~2 MiB of Pss
in every shim interpreter and in the template).
"""

from shim.common.deferred import defer

defer()
