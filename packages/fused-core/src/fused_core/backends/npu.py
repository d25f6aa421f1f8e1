"""Ascend NPU backend. Imported only when an NPU tensor is seen; importing it imports torch_npu.

torch_npu's own fused optimizers align every tensor to 512 bytes in the flat
buffer; we do the same. Private storage formats are not handled yet (issue 7).
"""

from __future__ import annotations

import torch_npu  # type: ignore[import-not-found]  # noqa: F401  (registers the npu device)

from . import Backend

BACKEND = Backend("npu", alignment_bytes=512)
