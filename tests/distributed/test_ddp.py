"""lowbit.distributed on two gloo processes on localhost: the gradient hook, ranks that agree on
their quantizer ranges, and a rank that dies."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lowbit
from lowbit.distributed import (
    CompressionState,
    RankFailedError,
    compress_gradients,
    decode_chunks,
    encode_chunks,
    quantized_allreduce,
    run_local,
)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


# --- in one process: the payload format ---------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_payload_round_trip_and_size(bits: int) -> None:
    x = torch.randn(100_003)
    payload, sent = encode_chunks(x, bits, 512)
    assert payload.dtype == torch.uint8
    assert torch.equal(decode_chunks(payload, x.numel(), bits, 512), sent)
    ratio = payload.numel() / (4 * x.numel())
    assert ratio <= (0.26 if bits == 8 else 0.14)
    assert CompressionState(bits=bits).payload_bytes(x.numel()) == payload.numel()
    chunk_max = torch.nn.functional.pad(x, (0, 512 - x.numel() % 512)).view(-1, 512).abs().amax(1)
    half_step = (chunk_max / (2 ** (bits - 1) - 1) / 2).repeat_interleave(512)[: x.numel()]
    assert ((x - sent).abs() <= half_step * 1.0001).all()


def test_payload_checks_and_settings() -> None:
    payload, _ = encode_chunks(torch.randn(1000), 8, 512)
    with pytest.raises(ValueError, match="same CompressionState settings"):
        decode_chunks(payload[:-1], 1000, 8, 512)
    with pytest.raises(ValueError, match="int8 or int4"):
        CompressionState(bits=2)
    with pytest.raises(ValueError, match="even"):
        CompressionState(chunk_size=511)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        compress_gradients(nn.Linear(2, 2))  # type: ignore[arg-type]


# --- two ranks: the hook ------------------------------------------------------------------------
def _hook_worker(rank: int) -> dict[str, object]:
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(5000, generator=gen) * (1 + rank)
    exact = x.clone()
    dist.all_reduce(exact)
    exact /= world
    out: dict[str, object] = {"exact": exact}
    for bits in (8, 4):
        state = CompressionState(bits=bits, chunk_size=512)
        mean = quantized_allreduce(x, state, key=0).wait()
        out[f"mean{bits}"] = mean
        out[f"ratio{bits}"] = state.ratio
        # every rank's error is at most half its chunk's step: the mean's, half the mean step
        _, sent = encode_chunks(x, bits, 512)
        err = (x - sent).abs()
        dist.all_reduce(err)
        out[f"bound{bits}"] = err / world
        # error feedback: the same gradient sent 30 times; the sum of the means drifts from
        # 30x the exact mean by at most one step's error with feedback, by 30 errors without
        for feedback in (True, False):
            fb = CompressionState(bits=bits, error_feedback=feedback)
            total = torch.zeros_like(x)
            drift = []
            for step in range(1, 31):
                total += quantized_allreduce(x, fb, key=3).wait()
                drift.append(float((total - step * exact).abs().max()))
            out[f"drift{bits}_{feedback}"] = torch.tensor(drift)
    return out


def test_hook_mean_within_quantization_error_and_error_feedback() -> None:
    results = run_local(_hook_worker, nproc=2, threads=1, timeout_s=120)
    r0, r1 = results
    for bits, min_db in ((8, 35.0), (4, 12.0)):
        assert torch.equal(r0[f"mean{bits}"], r1[f"mean{bits}"])  # every rank the same mean
        err = (r0[f"mean{bits}"] - r0["exact"]).abs()
        assert (err <= r0[f"bound{bits}"] * 1.0001 + 1e-7).all()
        assert sqnr_db(r0["exact"], r0[f"mean{bits}"]) > min_db
        with_fb, without = r0[f"drift{bits}_True"], r0[f"drift{bits}_False"]
        assert with_fb.max() <= with_fb[0] * 2.5  # bounded: no growth over 30 steps
        assert without[-1] > 10 * with_fb[-1]  # without feedback the bias piles up
        assert without[-1] > 20 * without[0]


# --- two ranks: DDP with the hook ----------------------------------------------------------------
def _ddp_worker(rank: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 128, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    out: dict[str, object] = {}
    for bits in (None, 8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        ddp = DistributedDataParallel(model)
        state = compress_gradients(ddp, bits=bits)
        nn.functional.cross_entropy(ddp(x), y).backward()
        out[f"grads{bits}"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        out[f"ratio{bits}"] = state.ratio
    return out


def test_ddp_hook_gradients_close_to_fp32_allreduce() -> None:
    r0, r1 = run_local(_ddp_worker, nproc=2, threads=1, timeout_s=120)
    assert r0["ratioNone"] == 1.0
    assert torch.equal(r0["grads8"], r1["grads8"])
    assert sqnr_db(r0["gradsNone"], r0["grads8"]) > 35.0
    assert r0["ratio8"] <= 0.26


# --- two ranks: quantization-aware training agrees on every range --------------------------------
def _tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _rank_data(rank: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 1, 8, 8, generator=gen) * (1 + rank), torch.randint(
        0, 4, (n,), generator=gen
    )


def _qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.endswith(("scale", "zero_point", "min_val", "max_val"))
    }


# LSQ with min-max calibration: the merged calibration must equal calibrating on all the data
MINMAX_LSQ = """
name: w4a4-minmax-lsq
default:
  weight: {dtype: int4, granularity: per_channel, symmetric: true, observer: minmax}
  input: {dtype: int8, granularity: per_tensor, symmetric: false, observer: minmax}
qat: {weight_range: lsq, input_range: lsq}
"""
RECIPES = ("w8a8-qat", "w4a4-lsq", "minmax-lsq")


def _recipe(name: str) -> lowbit.Recipe | str:
    return lowbit.Recipe.from_yaml(MINMAX_LSQ) if name == "minmax-lsq" else name


def _qat_worker(rank: int) -> dict[str, dict[str, object]]:
    x, y = _rank_data(rank)
    out = {}
    for recipe in RECIPES:
        model = lowbit.prepare_qat(_tiny_convnet(), _recipe(recipe), [x[:32], x[32:]])
        calibrated = _qparams(model)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
        lowbit.fit(ddp, batches, opt, epochs=1)
        trained = _qparams(model)
        frozen = lowbit.convert(model.eval())
        out[recipe] = {
            "calibrated": calibrated,
            "trained": trained,
            "converted": dict(frozen.state_dict()),
        }
    return out


def test_qat_ranks_hold_identical_qparams() -> None:
    r0, r1 = run_local(_qat_worker, nproc=2, threads=1, timeout_s=180)
    for recipe in RECIPES:
        for stage in ("calibrated", "trained", "converted"):
            a, b = r0[recipe][stage], r1[recipe][stage]
            assert a.keys() == b.keys() and a, (recipe, stage)
            for key in a:
                assert torch.equal(a[key], b[key]), (recipe, stage, key)
    # min-max statistics merge exactly: the same ranges as calibrating on both ranks' data
    recipe = _recipe("minmax-lsq")
    both = torch.cat([_rank_data(0)[0], _rank_data(1)[0]])
    alone = _qparams(lowbit.prepare_qat(_tiny_convnet(), recipe, [both]))
    checked = [k for k in alone if "input_quantizer" in k and k.endswith("scale")]
    assert len(checked) == 3
    for key in checked:
        torch.testing.assert_close(r0["minmax-lsq"]["calibrated"][key], alone[key])
    rank0_alone = _qparams(lowbit.prepare_qat(_tiny_convnet(), recipe, [_rank_data(0)[0]]))
    assert not torch.equal(rank0_alone[checked[0]], alone[checked[0]])


# --- a rank that fails ----------------------------------------------------------------------------
def _dying_worker(rank: int, how: str) -> int:
    if rank == 1:
        if how == "exit":
            os._exit(3)
        raise ValueError("boom on purpose")
    t = torch.ones(4)
    dist.all_reduce(t)  # rank 0 waits for a rank that never comes
    return int(t.sum())


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_dying_rank_fails_the_job_with_its_name(how: str) -> None:
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 of 2") as info:
        run_local(_dying_worker, nproc=2, args=(how,), threads=1, timeout_s=60)
    assert time.monotonic() - start < 60
    if how == "raise":
        assert "boom on purpose" in str(info.value)
    else:
        assert "exit code 3" in str(info.value)


def _sleepy_worker(rank: int) -> None:
    time.sleep(30)


def test_a_hanging_job_stops_at_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="timeout_s=3"):
        run_local(_sleepy_worker, nproc=2, threads=1, timeout_s=3)
    assert time.monotonic() - start < 25


def test_a_non_finite_chunk_arrives_as_nan_and_leaves_the_residual_clean() -> None:
    x = torch.randn(2048)
    x[700] = float("nan")
    x[1500] = float("inf")
    payload, sent = encode_chunks(x, 8, 512)
    out = decode_chunks(payload, x.numel(), 8, 512)
    assert torch.equal(out.isnan(), sent.isnan())
    assert out[512:1024].isnan().all() and out[1024:1536].isnan().all()  # the two bad chunks
    assert torch.isfinite(out[:512]).all() and torch.isfinite(out[1536:]).all()
