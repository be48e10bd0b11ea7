"""Training on several processes with torch.distributed (DDP), quantization-aware included.

- :func:`quantized_allreduce_hook` / :class:`CompressionState`: a DDP communication hook that
  sends gradient buckets as int8 or int4 with per-chunk scales and error feedback, counting the
  bytes it sends; :func:`fp32_allreduce_hook` is the float32 baseline with the same counting.
- :func:`compress_gradients`: register the hook on a DDP model in one call.
- :func:`sync_quantizers`: make every rank's quantizer ranges identical (``lowbit.prepare_qat``
  and ``lowbit.fit`` do it by themselves when a process group is initialised).
- :func:`run_local`: run a function on N local processes in a gloo group, with a clear error
  when a rank dies.
"""

from __future__ import annotations

from lowbit.distributed.hooks import (
    AllReduceState,
    CompressionState,
    decode_chunks,
    encode_chunks,
    fp32_allreduce_hook,
    quantized_allreduce,
    quantized_allreduce_hook,
)
from lowbit.distributed.launch import RankFailedError, free_port, run_local
from lowbit.distributed.setup import compress_gradients, sync_quantizers

__all__ = [
    "AllReduceState",
    "CompressionState",
    "RankFailedError",
    "compress_gradients",
    "decode_chunks",
    "encode_chunks",
    "fp32_allreduce_hook",
    "free_port",
    "quantized_allreduce",
    "quantized_allreduce_hook",
    "run_local",
    "sync_quantizers",
]
