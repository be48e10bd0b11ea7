"""DDP communication hooks: gradient buckets sent as int8 or int4 with error feedback.

DDP hands a hook each bucket of gradients (one flat tensor) and waits for the future it returns
to hold the averaged bucket. :func:`quantized_allreduce_hook` splits the bucket into chunks of
``chunk_size`` values, sends each chunk as ``bits``-bit integers with one float32 scale
(symmetric, round to nearest), and averages what every rank sent. The part of its gradient a
rank could not send (its quantization error) is kept per bucket and added to that bucket's next
gradient (**error feedback**), so nothing is lost over steps, only delayed.

Every rank sends the same number of bytes: ``c·chunk_size·bits/8 + 4·c`` for a bucket of ``n``
values in ``c = ceil(n/chunk_size)`` chunks (the last one padded), against ``4·n`` for float32
all-reduce; the state counts both. DDP regroups its buckets after the first iteration, so the
hook starts error feedback at the second. The
payloads travel by ``all_gather`` (an all-reduce cannot sum integers on different scales); on
two ranks that moves as many bytes per rank as a ring all-reduce of the same payload would.

    >>> import torch.nn as nn
    >>> state = CompressionState(bits=4)  # ddp.register_comm_hook(state, quantized_allreduce_hook)
    >>> state.payload_bytes(1024)
    520
"""

# no `from __future__ import annotations`: DDP checks the hooks' annotations at run time
import dataclasses
import math

import torch
import torch.distributed as dist

__all__ = [
    "AllReduceState",
    "CompressionState",
    "fp32_allreduce_hook",
    "quantized_allreduce",
    "quantized_allreduce_hook",
    "encode_chunks",
    "decode_chunks",
]


@dataclasses.dataclass
class AllReduceState:
    """What a hook sent: ``bytes_sent`` (this rank's payloads), ``fp32_bytes`` (what float32
    all-reduce would have sent for the same buckets) and ``buckets`` (hook calls).

    >>> AllReduceState().ratio
    0.0
    """

    group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    fp32_bytes: int = 0
    buckets: int = 0

    @property
    def ratio(self) -> float:
        """``bytes_sent / fp32_bytes`` (0 before the first bucket)."""
        return self.bytes_sent / self.fp32_bytes if self.fp32_bytes else 0.0

    def count(self, numel: int, sent: int) -> None:
        """Record one bucket of ``numel`` values sent as ``sent`` bytes."""
        self.bytes_sent += sent
        self.fp32_bytes += 4 * numel
        self.buckets += 1


@dataclasses.dataclass
class CompressionState(AllReduceState):
    """Settings and state of :func:`quantized_allreduce_hook`: ``bits`` (8 or 4),
    ``chunk_size`` values per scale (even), ``error_feedback`` (keep each bucket's residual
    and add it to the next step's gradient). ``residuals`` maps bucket index to residual.

    >>> CompressionState(bits=8, chunk_size=512).payload_bytes(512)
    516
    """

    bits: int = 8
    chunk_size: int = 512
    error_feedback: bool = True
    residuals: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    iterations: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits}: the gradient hook sends int8 or int4 (8 or 4)")
        if self.chunk_size < 2 or self.chunk_size % 2:
            raise ValueError(
                f"chunk_size={self.chunk_size} must be an even number >= 2 (two int4 values "
                "share a byte); 512 is a good default"
            )

    def payload_bytes(self, numel: int) -> int:
        """Bytes one rank sends for a bucket of ``numel`` values."""
        chunks = math.ceil(numel / self.chunk_size)
        return chunks * self.chunk_size * self.bits // 8 + 4 * chunks


def encode_chunks(x: torch.Tensor, bits: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat float tensor chunk by chunk: returns the uint8 payload (float32 scales,
    then the integers; two per byte for int4) and the dequantized values it stands for.

    >>> payload, sent = encode_chunks(torch.tensor([0.5, -1.0, 0.25, 0.0]), 8, 2)
    >>> payload.numel(), [round(v, 3) for v in sent.tolist()]
    (12, [0.504, -1.0, 0.25, 0.0])
    """
    n = x.numel()
    chunks = math.ceil(n / chunk_size)
    padded = torch.zeros(chunks * chunk_size, dtype=torch.float32, device=x.device)
    padded[:n] = x.detach().reshape(-1)
    rows = padded.view(chunks, chunk_size)  # (chunks, chunk_size)
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(dim=1)  # (chunks,): NaN or Inf where a chunk is not finite
    finite = torch.isfinite(amax)
    scale = torch.where(finite & (amax > 0), amax / qmax, torch.ones_like(amax))
    q = torch.round(rows / scale[:, None]).nan_to_num_(0.0).clamp_(-qmax, qmax)
    # a chunk holding NaN/Inf is sent with a NaN scale: every rank's mean shows it
    scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
    sent = (q * scale[:, None]).reshape(-1)[:n]
    if bits == 8:
        body = q.to(torch.int8).view(torch.uint8).reshape(-1)
    else:
        nibbles = (q + 8).to(torch.uint8)  # 1..15
        body = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).reshape(-1)  # (chunks*chunk/2,)
    return torch.cat([scale.view(torch.uint8), body]), sent


def decode_chunks(payload: torch.Tensor, numel: int, bits: int, chunk_size: int) -> torch.Tensor:
    """The float32 values of one :func:`encode_chunks` payload (its first ``numel``).

    >>> payload, _ = encode_chunks(torch.tensor([0.5, -1.0, 0.25]), 4, 2)
    >>> [round(v, 3) for v in decode_chunks(payload, 3, 4, 2).tolist()]
    [0.429, -1.0, 0.25]
    """
    chunks = math.ceil(numel / chunk_size)
    expected = chunks * chunk_size * bits // 8 + 4 * chunks
    if payload.numel() != expected:
        raise ValueError(
            f"a gradient payload of {payload.numel()} bytes, expected {expected} for {numel} "
            f"values at {bits} bits in chunks of {chunk_size}: every rank must use the same "
            "CompressionState settings"
        )
    scale = payload[: 4 * chunks].clone().view(torch.float32)  # (chunks,)
    body = payload[4 * chunks :]
    if bits == 8:
        q = body.clone().view(torch.int8).float().view(chunks, chunk_size)
    else:
        packed = body.view(chunks, chunk_size // 2)  # (chunks, chunk/2)
        q = torch.stack([packed & 15, packed >> 4], dim=2).float() - 8  # (chunks, chunk/2, 2)
        q = q.reshape(chunks, chunk_size)
    return (q * scale[:, None]).reshape(-1)[:numel]


def quantized_allreduce(
    tensor: torch.Tensor, state: CompressionState, key: int = 0, feedback: bool = True
) -> torch.futures.Future[torch.Tensor]:
    """The mean of ``tensor`` over all ranks, sent as ``state.bits``-bit chunks; ``key`` names
    the residual kept for error feedback (DDP's bucket index), ``feedback=False`` skips it
    for this call. A NaN or Inf in a chunk arrives as NaN (never hidden, never kept in the
    residual). Returns a future.

    >>> s = CompressionState()  # inside a process group: quantized_allreduce(grad, s).wait()
    >>> s.bytes_sent
    0
    """
    flat = tensor.detach().reshape(-1).float()
    feedback = feedback and state.error_feedback
    residual = state.residuals.get(key)
    if feedback and residual is not None and residual.shape == flat.shape:
        flat = flat + residual
    payload, sent = encode_chunks(flat, state.bits, state.chunk_size)
    if feedback:
        state.residuals[key] = torch.nan_to_num(flat - sent, nan=0.0, posinf=0.0, neginf=0.0)
    state.count(flat.numel(), payload.numel())
    world = dist.get_world_size(state.group)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    work = dist.all_gather(gathered, payload, group=state.group, async_op=True)
    assert work is not None
    numel, shape, dtype = flat.numel(), tensor.shape, tensor.dtype

    def average(_: torch.futures.Future[object]) -> torch.Tensor:
        total = torch.zeros(numel, dtype=torch.float32, device=tensor.device)
        for p in gathered:  # every rank decodes the same payloads: identical means
            total += decode_chunks(p, numel, state.bits, state.chunk_size)
        return (total / world).reshape(shape).to(dtype)

    return work.get_future().then(average)


def quantized_allreduce_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: each gradient bucket averaged over ranks as int8/int4 chunks
    with error feedback (see the module docstring).

    >>> hook = quantized_allreduce_hook  # ddp.register_comm_hook(CompressionState(bits=8), hook)
    """
    # DDP regroups its buckets after the first iteration: residuals start from the second
    feedback = state.iterations > 0
    future = quantized_allreduce(bucket.buffer(), state, key=bucket.index(), feedback=feedback)
    if bucket.is_last():
        state.iterations += 1
    return future


def fp32_allreduce_hook(
    state: AllReduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's own float32 all-reduce (the mean of each bucket), counting bytes like
    :func:`quantized_allreduce_hook` does: the baseline to compare it with.

    >>> hook = fp32_allreduce_hook  # ddp.register_comm_hook(AllReduceState(), hook)
    """
    buffer = bucket.buffer()
    state.count(buffer.numel(), buffer.numel() * buffer.element_size())
    averaged = buffer / dist.get_world_size(state.group)
    work = dist.all_reduce(averaged, group=state.group, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])
