"""Incremental-inference kernels: batched window gather, patch paste and projection to full.

``kfx.kernels.reference`` holds the plain-torch versions: the CPU path and the oracle that any
faster backend must match.
"""

from kfx.kernels.reference import gather_windows, pad_base, paste, project

__all__ = ["gather_windows", "pad_base", "paste", "project"]
