"""The GPU side of the store: copies, checksums and decoding on the GPU."""
