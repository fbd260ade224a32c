"""The per-host daemon: owns the memory tiers and answers every command over ZeroMQ."""
