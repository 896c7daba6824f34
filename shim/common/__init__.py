"""What both the launcher and the long-lived shim need: bundle files, options, the launcher->shim
config, records, the hand-written protobuf wire codec, errors, mounts, and the lean helpers.

Standard library only, like shim.launch, since the launcher imports it on every start
(the import contracts in pyproject.toml check it). Keep this file free of imports.
"""
