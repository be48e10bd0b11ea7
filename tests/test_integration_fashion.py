"""End to end on real data: a small ResNet trained on a Fashion-MNIST subset, quantized with the
shipped recipes, saved, loaded into a fresh copy and evaluated on held-out test images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.data import (
    FASHION_MNIST_ROOT,
    MLP,
    SmallResNet,
    calibration_batches,
    evaluate,
    load_fashion_mnist,
    train,
)

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: run `sudo apt-get install -y dataset-fashion-mnist`",
)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A SmallResNet trained for a few seconds on 6000 images; 2000 test images held out."""
    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    model = SmallResNet(widths=(8, 16, 32), blocks=(1, 1, 1))
    train(
        model,
        train_x[:6000],
        train_y[:6000],
        epochs=3,
        batch_size=64,
        lr=1e-2,
        optimizer="adam",
        channels_last=True,
        progress=False,
    )
    return model.eval(), train_x[6000:6512], test_x[:2000], test_y[:2000]


@pytest.mark.parametrize(
    ("recipe", "max_drop_points"),
    [("w8a8", 1.0), ("w8a8-dynamic", 1.0), ("w8a8-pertensor", 1.5), ("w4a16", 5.0)],
)
def test_recipe_keeps_accuracy_after_save_and_load(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
    tmp_path: Path,
    recipe: str,
    max_drop_points: float,
) -> None:
    model, calib_x, test_x, test_y = trained
    fp32 = evaluate(model, test_x, test_y)
    assert fp32 > 0.7, "the float model must have learned something for this test to mean much"
    qmodel = lowbit.quantize(model, recipe, data=calibration_batches(calib_x, n=512))
    path = lowbit.save(qmodel, tmp_path / f"{recipe}.lowbit")
    fresh = SmallResNet(widths=(8, 16, 32), blocks=(1, 1, 1))  # untrained: weights come from file
    restored = lowbit.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(restored(test_x[:256]), qmodel(test_x[:256]))
    quantized = evaluate(restored, test_x, test_y)
    assert 100 * (fp32 - quantized) <= max_drop_points


def test_fewer_bits_mean_a_smaller_file_and_more_error(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    model, calib_x, test_x, _ = trained
    with torch.no_grad():
        reference = model(test_x[:500])
    sizes, errors = {}, {}
    for recipe in ("w8a16", "w4a16"):
        qmodel = lowbit.quantize(model, recipe, data=calibration_batches(calib_x, n=256))
        sizes[recipe] = lowbit.save(qmodel, tmp_path / recipe).stat().st_size
        with torch.no_grad():
            errors[recipe] = lowbit.sqnr_db(reference, qmodel(test_x[:500]))
    weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    # 4 bits fewer per weight, minus per-group-32 fp32 scales and int4 zero points (1.125 bits)
    assert sizes["w8a16"] - sizes["w4a16"] >= 0.3 * weights
    assert errors["w8a16"] > errors["w4a16"] + 6.0  # about 6 dB per bit; 4 bits fewer


# --- integer execution against lowbit's own simulation ---------------------------------------
# The bar: output SQNR >= 35 dB and top-1 agreement >= 99.5% between the integer
# kernels and the simulation of the same quantized model, for every kernel path.


def _simulated(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layers = lowbit.quantized_layers(qmodel).values()
    for layer in layers:
        layer.set_kernel("reference")
    with torch.no_grad():
        out = torch.cat([qmodel(x[i : i + 500]) for i in range(0, len(x), 500)])
    for layer in layers:
        layer.set_kernel(None)
    return out


def _check_agreement(run: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        out = torch.cat([run(x[i : i + 500]) for i in range(0, len(x), 500)])
    agreement = float((out.argmax(1) == reference.argmax(1)).float().mean())
    db = lowbit.sqnr_db(reference, out)
    assert db >= 35.0 and agreement >= 0.995, f"{db:.1f} dB, {100 * agreement:.2f}% agreement"


@pytest.fixture(scope="module")
def trained_mlp(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
) -> nn.Module:
    """An MLP 784-256-128-10 on the same 6000 images: Linear layers the int4 kernel can take."""
    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    model = MLP(784, (256, 128), 10)
    train(
        model,
        train_x[:6000],
        train_y[:6000],
        epochs=3,
        batch_size=64,
        lr=1e-3,
        optimizer="adam",
        progress=False,
    )
    return model.eval()


@pytest.mark.parametrize(
    ("recipe", "compiled", "kernels"),
    [
        ("w8a8", False, {"onednn-int8"}),
        ("w8a8", True, {"onednn-int8"}),  # fused ReLU/add, uint8 between layers
        ("w8a8-dynamic", True, {"onednn-int8"}),
        ("w4a8", False, {"onednn-int8"}),
        ("w8a16", False, {"bf16-dequant", "int8-weight-only"}),
        ("w4a16", False, {"bf16-dequant"}),
    ],
)
def test_resnet_integer_execution_agrees_with_the_simulation(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
    recipe: str,
    compiled: bool,
    kernels: set[str],
) -> None:
    model, calib_x, test_x, _ = trained
    qmodel = lowbit.quantize(model, recipe, data=calibration_batches(calib_x, n=512))
    reference = _simulated(qmodel, test_x)
    run = lowbit.compile(qmodel, "torch", example_inputs=calib_x[:64]) if compiled else qmodel
    used = {row.kernel for row in lowbit.kernel_report(run).layers}
    if not (used & kernels):
        pytest.skip(f"this machine runs {used} for {recipe} (no oneDNN int8 or bfloat16)")
    _check_agreement(run, reference, test_x)


@pytest.mark.parametrize(
    ("recipe", "kernel"),
    [
        ("w8a8", "onednn-int8"),
        ("w8a8-dynamic-token", "onednn-int8"),
        ("w8a16", "int8-weight-only"),
        ("w4a16", "int4-weight-only"),
    ],
)
def test_mlp_integer_execution_agrees_with_the_simulation(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
    trained_mlp: nn.Module,
    recipe: str,
    kernel: str,
) -> None:
    _, calib_x, test_x, _ = trained
    qmodel = lowbit.quantize(trained_mlp, recipe, data=calibration_batches(calib_x, n=512))
    reference = _simulated(qmodel, test_x)
    used = {row.kernel for row in lowbit.kernel_report(qmodel).layers}
    if kernel not in used:
        pytest.skip(f"this machine runs {used} for {recipe}")
    _check_agreement(qmodel, reference, test_x)
