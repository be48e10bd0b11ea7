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
