"""The layer below the stages: user errors, whole-or-nothing files, packages and versions, the process group.
Imports nothing else of the package, so every stage and wing may use it."""
