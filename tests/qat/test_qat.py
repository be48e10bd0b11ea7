"""Quantization-aware training: state that checkpoints and resumes, learned step sizes, batch
norm trained folded, gradient quantization, conversion to the integer form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, Recipe, RecipeError, load_recipe
from lowbit.nn.qat_ops import fake_quantize_gradient, lsq_grad_factor
from lowbit.nn.quantizer import Quantizer
from lowbit.observers import OBSERVERS, make_observer
from lowbit.report.metrics import sqnr_db
from lowbit.spec import PerChannel, PerGroup, PerTensor, QDtype, QuantSpec


class ConvNet(nn.Module):
    """Conv-BN-ReLU twice and a Linear head: what QAT with folded batch norms is for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)


def _float_model() -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _qat(recipe: str | Recipe = "w4a8") -> nn.Module:
    model = lowbit.prepare(_float_model(), recipe, qat=True)
    return lowbit.calibrate(model, [_data(1)[0]])


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 2) -> float:
    x, y = _data(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_prepare_qat_learns_scales_and_trains_batch_norm_folded() -> None:
    model = _qat()
    assert model.training
    conv = model.conv1
    assert conv.qat_bn is not None and isinstance(model.bn1, nn.Identity)
    wq, iq = conv.weight_quantizer, conv.input_quantizer
    assert isinstance(wq.scale, nn.Parameter) and wq.scale.shape == (8,)
    assert isinstance(iq.scale, nn.Parameter) and isinstance(iq.zero_point, nn.Parameter)
    before = wq.scale.detach().clone(), conv.qat_bn.running_mean.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = _train(model, opt, 1)
    last = _train(model, opt, 30)
    assert last < first
    assert not torch.equal(wq.scale.detach(), before[0])  # the step size learned
    assert not torch.equal(conv.qat_bn.running_mean, before[1])  # batch statistics moved
    assert wq.steps == 31


def test_half_trained_state_dict_resumes_to_the_same_result() -> None:
    model = _qat()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 3)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3)
    model.eval()
    x = _data(5)[0]
    want = model(x)

    fresh = lowbit.prepare(_float_model(), "w4a8", qat=True)  # not calibrated: shapes only
    fresh.load_state_dict(saved[0])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(saved[1])
    _train(fresh, opt2, 3)
    fresh.eval()
    assert torch.equal(fresh(x), want)
    assert fresh.conv1.weight_quantizer.steps == model.conv1.weight_quantizer.steps == 6


def test_converted_qat_model_matches_its_training_form_on_integer_kernels() -> None:
    model = _qat()
    _train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 10)
    model.eval()
    x = _data(6)[0]
    with torch.no_grad():
        want = model(x)
        q = lowbit.convert(model)
        got = q(x)
    assert q.conv1.qat_bn is None and q.conv1.frozen
    assert q.conv1.kernel_name != "reference"  # the integer path, as after PTQ
    assert sqnr_db(want, got) > 30.0


def test_batch_norm_statistics_freeze_after_the_chosen_step() -> None:
    recipe = load_recipe("w4a8").to_dict() | {"qat": {"freeze_bn_after": 2}}
    model = _qat(Recipe.from_dict(recipe))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    frozen = model.conv1.qat_bn.running_var.clone()
    _train(model, opt, 3)
    assert torch.equal(model.conv1.qat_bn.running_var, frozen)
    assert not model.conv1.qat_bn.training


def test_moving_average_ranges_move_then_freeze() -> None:
    data = load_recipe("w8a8").to_dict()
    data["qat"] = {
        "weight_range": "minmax",
        "input_range": "moving_average",
        "averaging_constant": 0.5,
        "freeze_ranges_after": 3,
    }
    model = _qat(Recipe.from_dict(data))
    iq = model.head.input_quantizer
    assert not iq.learned and iq.range == "moving_average"
    start = iq.scale.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data(3)
    for step in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x * 3.0), y).backward()  # a wider range than calibration
        opt.step()
        if step == 2:
            at_freeze = iq.scale.clone()
    assert float(at_freeze) > float(start)
    assert torch.equal(iq.scale, at_freeze)


def test_training_before_calibration_names_the_fix() -> None:
    model = lowbit.prepare(_float_model(), "w4a8", qat=True)
    with pytest.raises(RuntimeError, match=r"calibrate\(model, data\)"):
        model(_data()[0])


def test_lsq_gradient_scale_is_one_over_sqrt_n_qp() -> None:
    assert lsq_grad_factor((16, 9), PerChannel(0), QDtype(4)) == pytest.approx(1 / (9 * 7) ** 0.5)
    q = Quantizer(QuantSpec("int4", "per_channel"), shape=(4, 8))
    q.set_range("lsq")
    q.observe_tensor(torch.randn(4, 8))
    w = torch.randn(4, 8)
    q.train()(w).square().sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == (4,)
    assert torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_gradient_rounding_is_unbiased(bits: int) -> None:
    spec = QuantSpec(f"int{bits}", rounding="stochastic")
    grad = torch.randn(64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([fake_quantize_gradient(grad, spec, gen) for _ in range(2000)])
    step = float(grad.abs().max()) / spec.qdtype.qmax
    assert len(torch.unique(draws[0] / step)) <= 2**bits
    stderr = draws.std(dim=0) / 2000**0.5 + 1e-4 * step  # on the grid: no spread
    z = ((draws.mean(dim=0) - grad) / stderr).abs()
    assert float(z.max()) < 5.0  # every element's mean within 5 standard errors
    nearest = fake_quantize_gradient(grad, QuantSpec(f"int{bits}", rounding="nearest"))
    assert (draws.mean(dim=0) - grad).abs().mean() < (nearest - grad).abs().mean() / 4


def test_recipe_gradient_spec_quantizes_the_gradients_a_layer_passes_back() -> None:
    data = load_recipe("w8a8").to_dict()
    data["default"]["gradient"] = {"dtype": "int4", "rounding": "stochastic"}
    recipe = Recipe.from_dict(data)
    assert recipe.default is not None and recipe.default.gradient is not None
    model = lowbit.prepare(nn.Sequential(nn.Linear(16, 16)), recipe, qat=True)
    lowbit.calibrate(model, [torch.randn(8, 16)])
    x = torch.randn(8, 16, requires_grad=True)
    model(x).pow(3).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    for grad in (x.grad, model[0].weight.grad):  # on a 4-bit grid of its own range
        step = float(grad.abs().max()) / 7
        levels = torch.round(grad / step)
        assert (
            torch.allclose(levels * step, grad, atol=1e-5 * step) and levels.unique().numel() <= 16
        )


def test_gradient_spec_is_checked() -> None:
    with pytest.raises(RecipeError, match="per_tensor or per_channel"):
        QuantConfig.from_dict(
            {
                "weight": {"dtype": "int8"},
                "gradient": {"dtype": "int8", "granularity": "per_group:8"},
            }
        )
    with pytest.raises(RecipeError, match=r"qat\.weight_range='ema' is unknown"):
        Recipe.from_dict(load_recipe("w8a8").to_dict() | {"qat": {"weight_range": "ema"}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['epochs'\]"):
        Recipe.from_dict(load_recipe("w8a8").to_dict() | {"qat": {"epochs": 3}})


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_statistics_round_trip_through_state_dict(name: str) -> None:
    spec = QuantSpec("int8", observer=name)
    obs = make_observer(spec)
    for seed in range(3):
        obs(torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)))
    fresh = make_observer(spec)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.batches == 3
    for a, b in zip(fresh.qparams(), obs.qparams(), strict=True):
        assert torch.equal(a, b)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_qat_recovers_what_post_training_2_bit_quantization_loses() -> None:
    """The claim QAT exists for: at w2a4 rounding to nearest loses accuracy that a few
    epochs of LSQ training win back (digits, an MLP)."""
    x, y, tx, ty = _digits()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))  # fmt: skip
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    lowbit.fit(mlp, batches, torch.optim.Adam(mlp.parameters(), lr=3e-3), epochs=15)
    fp32 = _accuracy(mlp, tx, ty)
    data = load_recipe("w2a4-lsq").to_dict()
    del data["first"], data["last"]  # every layer at 2 bits, one min-max scale per tensor
    data["default"]["weight"] = {"dtype": "int2", "granularity": "per_tensor", "observer": "minmax"}
    recipe = Recipe.from_dict(data)
    ptq = _accuracy(lowbit.quantize(mlp, recipe, data=[x[:512]]), tx, ty)
    q = lowbit.prepare_qat(mlp, recipe, [x[:512]])
    lowbit.fit(q, batches, torch.optim.Adam(q.parameters(), lr=1e-3), epochs=6)
    qat = _accuracy(lowbit.convert(q.eval()), tx, ty)
    assert fp32 > 0.9
    assert qat > ptq + 0.2, (fp32, ptq, qat)  # measured: 0.91, 0.53, 0.89
    assert qat > fp32 - 0.05, (fp32, ptq, qat)


def _lsq_reference(x, scale, zero, dtype, gran, factor):
    """LSQ written with autograd's own ops (straight-through round, scaled gradients)."""
    from lowbit.nn.qat_ops import round_ste
    from lowbit.primitives import _broadcast

    def scaled(t):
        return (t - t * factor).detach() + t * factor

    view, s, restore = _broadcast(x, scaled(scale), gran)
    _, z, _ = _broadcast(x, scaled(zero), gran)
    z = round_ste(z)
    q = torch.clamp(round_ste(view / s) + z, dtype.qmin, dtype.qmax)
    return restore((q - z) * s)


@pytest.mark.parametrize(
    "gran", [PerTensor(), PerChannel(0), PerGroup(4)], ids=["tensor", "channel", "group"]
)
def test_fused_lsq_matches_the_autograd_formula(gran) -> None:
    from lowbit.nn.qat_ops import lsq_fake_quantize
    from lowbit.primitives import qparam_shape

    torch.manual_seed(0)
    dtype = QDtype(4, signed=False)
    shape = qparam_shape((6, 8), gran)
    grads = []
    for fn in (lsq_fake_quantize, _lsq_reference):
        x = (torch.randn(6, 8) * 2).requires_grad_()
        torch.manual_seed(1)
        x.data = torch.randn(6, 8) * 2
        scale = torch.full(shape, 0.2).requires_grad_()
        zero = torch.full(shape, 7.3).requires_grad_()
        out = fn(x, scale, zero, dtype, gran, 0.3)
        (out * torch.linspace(-1, 1, 48).view(6, 8)).sum().backward()
        grads.append((out.detach(), x.grad, scale.grad, zero.grad))
    for mine, ref in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(mine, ref)


# --- binary weights ----------------------------------------------------------------------------
def test_binary_weights_are_sign_times_a_least_squares_scale() -> None:
    from lowbit.primitives import fake_quantize, pack_bits, quantize, unpack_bits

    torch.manual_seed(0)
    w = torch.randn(4, 64)
    spec = QuantSpec("binary", "per_channel", observer="mse", observer_args={"min_ratio": 0.05})
    obs = make_observer(spec)
    obs(w)
    scale, zero = obs.qparams()
    assert torch.equal(zero, torch.zeros(4, dtype=torch.int32))
    # XNOR-Net: the least-squares scale of sign(w) is mean |w| per row; the search finds it
    torch.testing.assert_close(scale, w.abs().mean(dim=1), rtol=0.05, atol=0)
    q = quantize(w, scale, zero, spec.qdtype, spec.gran)
    assert set(q.unique().tolist()) == {-1, 1}
    assert torch.equal(q.sign(), w.sign().to(q.dtype))
    packed = pack_bits(q, spec.qdtype)
    assert packed.numel() == w.numel() // 8  # one bit per weight
    assert torch.equal(unpack_bits(packed, spec.qdtype, w.numel()).view(4, 64), q)
    fq = fake_quantize(w, scale, zero, spec.qdtype, spec.gran)
    torch.testing.assert_close(fq, w.sign() * scale[:, None])


def test_binary_lsq_gradients_follow_binaryconnect() -> None:
    from lowbit.nn.qat_ops import lsq_fake_quantize

    x = torch.tensor([0.3, -0.2, 2.0, -3.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    out = lsq_fake_quantize(x, s, torch.tensor(0.0), QDtype.parse("binary"), PerTensor(), 1.0)
    assert out.tolist() == [1.0, -1.0, 1.0, -1.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # straight through only where |x/s| <= 1
    # d(s * sign(x))/ds - x/s inside: (1 - 0.3) + (-1 + 0.2) + 1 + (-1)
    assert abs(s.grad.item() - (0.7 - 0.8 + 1 - 1)) < 1e-6


def test_binary_recipe_trains_converts_and_saves(tmp_path) -> None:
    from lowbit.data import load_digits

    x, y = load_digits("train")
    vx, vy = load_digits("test")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    lowbit.fit(net, [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)], opt, epochs=15)
    model = lowbit.prepare_qat(net, "w1a8-binary", [x[:256]])
    assert str(model[3].weight_quantizer.spec.qdtype) == "binary"
    assert str(model[1].weight_quantizer.spec.qdtype) == "int8"  # the first layer stays at 8
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    lowbit.fit(
        model, [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)], opt, epochs=10
    )
    frozen = lowbit.convert(model.eval())
    ints = frozen[3].weight.int_repr()
    assert set(ints.unique().tolist()) == {-1, 1}
    path = lowbit.save(frozen, tmp_path / "binary.lowbit")
    loaded = lowbit.load(path, net)
    with torch.no_grad():
        accuracy = float((loaded(vx).argmax(1) == vy).float().mean())
        fake = float((model(vx).argmax(1) == vy).float().mean())
    assert accuracy > 0.85 and abs(accuracy - fake) < 0.02
