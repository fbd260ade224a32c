"""Code that spans hosts: placement (`place`), its simulator and the fleet gateway.

It talks to daemons only through `sllmctl.wire` and reads checkpoints' shapes through
`sllmctl.store.format`; it never imports the daemon, the engine or torch (the import contract
in pyproject.toml keeps it so). Empty until `place` arrives (see docs/roadmap.md).
"""
