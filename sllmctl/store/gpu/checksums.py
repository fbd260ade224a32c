"""Checksums on the GPU: sum64x2 of data already copied there, compared with the manifest.

`GpuChecker` sums each chunk with two integer reductions on the GPU (on a stream of its own,
once the chunk has landed) and compares every chunk with the manifest's sums at the end of a
load, with one synchronisation; `warm_up` runs its kernels once so that no load pays for
loading their code. GpuLoad (copy.py) drives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.datafile import reconvert_hint
from sllmctl.store.format import ALIGNMENT, PAGE_WORDS, DataFile
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch


def _signed(hex16: str) -> int:
    v = int(hex16, 16)
    return v - (1 << 64) if v >= 1 << 63 else v


def expected_sums(model: StoredModel, device: Any) -> list[torch.Tensor]:
    """Each file's manifest checksums as an int64 tensor [chunks, 2] on `device`. The copy is
    queued from pinned memory, so it never blocks the caller (a copy from pageable memory
    would wait for every copy queued before it)."""
    return [manifest_sums(f).pin_memory().to(device, non_blocking=True)
            for f in model.manifest.files]


def manifest_sums(f: DataFile) -> torch.Tensor:
    """A data file's manifest checksums as an int64 tensor [chunks, 2] (as GpuChecker
    computes them)."""
    import torch

    rows = [(_signed(c[:16]), _signed(c[16:])) for c in f.checksums]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def _page_sums(data: torch.Tensor) -> torch.Tensor:
    """Sum of each 4 KiB page of `data` (whole pages) as 64-bit words, wrapping."""
    import torch

    return data.view(torch.int64).view(-1, PAGE_WORDS).sum(dim=1)


def warm_up(device: Any) -> None:
    """Run the loader's kernels once on `device` (a copy from pinned memory, a GpuChecker's
    sums and comparison): CUDA loads a kernel's code on its first use, which would otherwise
    cost the first load tens of milliseconds."""
    import torch

    device = torch.device(device)
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            # one file of a whole chunk and a short one: both of `add`'s paths
            chunk = 2 * ALIGNMENT
            checker = GpuChecker(chunk, [3 * ALIGNMENT], device)
            host = torch.zeros(3 * ALIGNMENT, dtype=torch.uint8).pin_memory()
            checker.add(0, 0, torch.empty_like(host, device=device).copy_(host, non_blocking=True))
            checker.compare([torch.zeros(2, 2, dtype=torch.int64, device=device)])[1].cpu()
        stream.synchronize()


class GpuChecker:
    """sum64x2 of chunks already on the GPU, written into per-file result tensors."""

    def __init__(self, chunk: int, sizes: list[int], device: Any) -> None:
        """`chunk`: the checksum chunk size; `sizes`: each data file's size in bytes."""
        import torch

        self.chunk = chunk
        self.sizes = sizes
        self.pages_per_chunk = chunk // ALIGNMENT
        self.weights = torch.arange(1, self.pages_per_chunk + 1, dtype=torch.int64,
                                    device=device)
        self.results = [torch.zeros(-(-size // chunk), 2, dtype=torch.int64, device=device)
                        for size in sizes]

    def add(self, file: int, offset: int, data: torch.Tensor) -> None:
        """Checksum `data`: bytes of `file` from `offset`, whole chunks (the file's last
        chunk may be short)."""

        end = offset + data.numel()
        ragged = end % self.chunk and end != self.sizes[file]
        if offset % self.chunk or ragged:
            raise ValueError("GPU checksums need whole chunks")

        pages = _page_sums(data)
        first = offset // self.chunk
        full = pages.numel() // self.pages_per_chunk
        out = self.results[file]
        if full:
            p = pages[: full * self.pages_per_chunk].view(full, self.pages_per_chunk)
            out[first:first + full, 0] = p.sum(dim=1)
            out[first:first + full, 1] = (p * self.weights).sum(dim=1)
        rest = pages[full * self.pages_per_chunk:]
        if rest.numel():
            out[first + full, 0] = rest.sum()
            out[first + full, 1] = (rest * self.weights[: rest.numel()]).sum()

    def compare(self, expected: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per file, which chunks differ, and per file whether any does (on the GPU; nothing
        waits)."""
        import torch

        bad = [torch.ne(r, e).any(dim=1) for r, e in zip(self.results, expected, strict=True)]
        return bad, torch.stack([b.any() for b in bad])

    def report(self, bad: list[torch.Tensor], flags: torch.Tensor, model: StoredModel
               ) -> None:
        """Wait for `compare`'s result; raise CorruptCheckpoint naming the first bad chunk
        of `model`."""
        host = flags.cpu()
        if not bool(host.any()):
            return
        file = int(host.nonzero()[0])
        chunk = int(bad[file].nonzero()[0])
        f = model.manifest.files[file]
        end = min((chunk + 1) * self.chunk, f.size)
        raise CorruptCheckpoint(
            f"model {model.name}: data file {f.path} chunk {chunk} "
            f"(bytes {chunk * self.chunk}-{end}) fails its checksum",
            hint=reconvert_hint(model),
        )
