"""CPU memory for torch: transparent huge pages for large buffers.

PyTorch backs a CPU buffer of 2 MB or more with transparent huge pages (``madvise``) when
``THP_MEM_ALLOC_ENABLE`` is set; it reads the variable once, at the process's first CPU
allocation. Without it, each forward pass maps its large activations afresh in 4 KB pages:
on a 2-core CPU, a SqueezeNet-1.1 batch of 64 spent about 40% of its time in page faults
(5.7 M minor faults for 20 passes; with huge pages 0.3 M, and the passes 1.6x faster).
The results are the same bits: only how the memory is mapped changes.
"""

from __future__ import annotations

import os

__all__ = ["HUGE_PAGES_ENV", "use_huge_pages"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> None:
    """Ask PyTorch for huge pages in this process, unless the environment says otherwise.

    Call it before the process allocates its first CPU tensor (a worker's constructor, the
    start of a training loop); later, it changes nothing. ``THP_MEM_ALLOC_ENABLE=0`` in the
    environment turns it off. The kernel decides in the end: with
    ``/sys/kernel/mm/transparent_hugepage/enabled`` at ``never`` nothing changes.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
