"""Launch configuration of the Numba CUDA kernels: ONE dict, read at every launch.

Tests (and users tuning for a GPU) may change it, e.g.
``monkeypatch.setitem(config.LAUNCH, "threads", 8)``; the kernels are compiled per distinct
configuration (shared-memory sizes are compile-time constants) and memoised.

threads   threads per block (1-d blocks) of every kernel
k_block   templates (matching) / output channels (render) one block computes
tile      (rows, cols) of pooled outputs (matching) or rendered pixels (render) per block;
          shrunk at launch until the staged tiles fit the capacities below
x_smem    elements of the staged input tile (one channel, with its halo)
w_smem    elements of the staged template taps (k_block * kh * kw)
z_smem    elements of the per-block accumulators (k_block * tile rows * tile cols of z or r)
max_blocks  grid cap of the grid-stride elementwise kernels (fill, convert, index range)

Static shared memory per block of the tiled kernels is (x_smem + w_smem + z_smem) elements,
32 KiB in float64 with the defaults, under the 48 KiB static limit. A geometry whose halo tile
or template does not fit even a 1 x 1 tile of one template runs the direct (global memory)
kernels instead; the results are the same.
"""

from typing import NamedTuple

LAUNCH = {
    "threads": 256,
    "k_block": 8,
    "tile": (8, 8),
    "x_smem": 1024,
    "w_smem": 1024,
    "z_smem": 2048,
    "max_blocks": 1024,
}


class Launch(NamedTuple):
    """One launch configuration, frozen (the fields of ``LAUNCH``, as ints); hashable, so it
    is the memoisation key of the compiled kernels."""

    threads: int
    k_block: int
    tile: tuple
    x_smem: int
    w_smem: int
    z_smem: int
    max_blocks: int


def snapshot():
    """The current configuration (``LAUNCH`` read now) as a ``Launch``."""
    return Launch(
        threads=int(LAUNCH["threads"]),
        k_block=int(LAUNCH["k_block"]),
        tile=tuple(int(t) for t in LAUNCH["tile"]),
        x_smem=int(LAUNCH["x_smem"]),
        w_smem=int(LAUNCH["w_smem"]),
        z_smem=int(LAUNCH["z_smem"]),
        max_blocks=int(LAUNCH["max_blocks"]),
    )
