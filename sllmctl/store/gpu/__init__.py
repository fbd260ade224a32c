"""The GPU path: stored models to GPU memory, checksummed on the GPU.

loader.py reads from disk or the page cache (files.py) into a pool of pinned buffers;
pinned.py starts from a model already in pinned memory; both hand pieces to copy.py's
`GpuLoad`, which copies them and checks them with checksums.py; split.py carries compressed
pieces across; decode.py decodes exp23 pieces on the GPU (codec_exp23.py is its CPU twin).
"""
