"""Tied weights: one QTensor after convert, stored once, tied again after load, counted once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.api import prepared_info, quantize
from lowbit.config import QuantConfig, Recipe, Rule
from lowbit.export import load, read_header, save, summarize, theoretical_size
from lowbit.nn import QTensor
from lowbit.spec import QuantSpec

INT8 = QuantConfig(weight=QuantSpec("int8", "per_channel"))
INT4 = QuantConfig(weight=QuantSpec("int4", "per_group:4", symmetric=False))
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def _net(tie: bool = True, seed: int = 0) -> nn.Sequential:
    """Three square Linears; the second holds the first's weight when ``tie``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    if tie:
        net[2].weight = net[0].weight
    return net


def _recipe(*rules: Rule) -> Recipe:
    return Recipe(INT8, rules=rules, name="ties")


def test_layers_sharing_a_weight_share_one_qtensor_stored_once(tmp_path: Path) -> None:
    q = quantize(_net(), _recipe())
    assert q[0].weight is q[2].weight and isinstance(q[0].weight, QTensor)
    assert any("held and stored once" in note for note in prepared_info(q).notes)
    path = save(q, tmp_path / "tied.lowbit")
    header = read_header(path)
    assert header.ties == {"2.weight": "0.weight"}
    assert "0.weight.qdata" in header.tensors
    assert not any(key.startswith("2.weight") for key in header.tensors)
    untied = save(quantize(_net(tie=False), _recipe()), tmp_path / "untied.lowbit")
    assert path.stat().st_size <= untied.stat().st_size - 64  # 64 int8 weights fewer
    back = load(path, _net(seed=9))
    assert back[0].weight is back[2].weight
    assert torch.equal(back(X), q(X))
    again = save(back, tmp_path / "again.lowbit")
    assert again.read_bytes() == path.read_bytes()


def test_the_sizes_count_a_tied_weight_once(tmp_path: Path) -> None:
    tied, untied = quantize(_net(), _recipe()), quantize(_net(tie=False), _recipe())
    assert theoretical_size(untied) - theoretical_size(tied) == 64 + 8 * 4  # weight + scales
    a = summarize(save(tied, tmp_path / "a.lowbit"))
    b = summarize(save(untied, tmp_path / "b.lowbit"))
    assert b.fp32_bytes - a.fp32_bytes == 64 * 4
    assert sum(r.bytes for r in b.rows) - sum(r.bytes for r in a.rows) == 64 + 8 * 4


def test_a_tie_between_different_specs_is_broken_and_said(tmp_path: Path) -> None:
    q = quantize(_net(), _recipe(Rule("2", INT4)))
    assert q[0].weight is not q[2].weight
    notes = prepared_info(q).notes
    assert any(n.startswith("2: weight tied to 0's") and "tie is broken" in n for n in notes)
    path = save(q, tmp_path / "m.lowbit")
    assert read_header(path).ties == {}
    back = load(path, _net(seed=9))
    assert torch.equal(back(X), q(X))
    assert back[2].weight.spec == INT4.weight


def test_a_tie_with_a_float_layer_is_broken_and_said(tmp_path: Path) -> None:
    q = quantize(_net(), _recipe(Rule("2", None)))
    assert type(q[2]) is nn.Linear and isinstance(q[0].weight, QTensor)
    notes = prepared_info(q).notes
    assert any(n.startswith("0: weight tied to 2") and "keeps it in float" in n for n in notes)
    path = save(q, tmp_path / "m.lowbit")
    header = read_header(path)
    assert "2.weight" in header.tensors and "0.weight.qdata" in header.tensors
    assert header.kept_float == {"2": "a recipe rule keeps it in float (config: null)"}
    assert torch.equal(load(path, _net(seed=9))(X), q(X))


def test_float_ties_are_stored_once_and_the_same_parameter_after_load(tmp_path: Path) -> None:
    q = quantize(_net(), _recipe(Rule("0", None), Rule("2", None)))
    assert q[0].weight is q[2].weight and isinstance(q[0].weight, nn.Parameter)
    path = save(q, tmp_path / "m.lowbit")
    header = read_header(path)
    assert header.ties == {"2.weight": "0.weight"} and "2.weight" not in header.tensors
    back = load(path, _net(seed=9))
    assert back[0].weight is back[2].weight and isinstance(back[0].weight, nn.Parameter)
    assert torch.equal(back(X), q(X))


def test_a_module_used_twice_is_stored_once(tmp_path: Path) -> None:
    def build(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        shared = nn.Linear(8, 8)
        return nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 2))

    q = quantize(build(0), "w8a8", data=[torch.randn(16, 8)])
    path = save(q, tmp_path / "m.lowbit")
    header = read_header(path)
    assert header.ties == {"2": "0"}
    assert not any(key.startswith("2.") for key in header.tensors)
    back = load(path, build(9))
    assert back[0] is back[2]
    assert torch.equal(back(X), q(X))


def test_a_crafted_tie_between_different_specs_is_refused(tmp_path: Path) -> None:
    from crafting import craft

    q = quantize(_net(tie=False), _recipe(Rule("2", INT4)))
    src = save(q, tmp_path / "m.lowbit")

    def tie(meta: dict) -> None:
        meta["ties"] = {"2.weight": "0.weight"}

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith("2.weight.")]:
            del tensors[key]

    path = craft(src, tmp_path / "crafted.lowbit", header=tie, tensors=drop)
    with pytest.raises(Exception) as info:
        load(path, _net(tie=False, seed=9))
    assert type(info.value).__name__ == "CheckpointError"
    assert "'2." in str(info.value) and str(path) in str(info.value)


@pytest.fixture(scope="module")
def gpt2() -> type[nn.Module]:
    transformers = pytest.importorskip("transformers")

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True
        )
        return transformers.GPT2LMHeadModel(config).eval()

    return build  # type: ignore[return-value]


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
def test_gpt2_lm_head_tied_to_its_embedding(gpt2: type, recipe: str, tmp_path: Path) -> None:
    model = gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    q = quantize(model, recipe, data=[ids])
    path = save(q, tmp_path / "gpt2.lowbit")
    header = read_header(path)
    back = load(path, gpt2(5))
    wte, head = back.transformer.wte.weight, back.lm_head.weight
    assert q.lm_head.weight is q.transformer.wte.weight  # the recipe's embedding spec is
    assert header.ties == {"lm_head.weight": "transformer.wte.weight"}  # its weight spec
    assert any("lm_head: weight tied to transformer.wte's" in n for n in prepared_info(q).notes)
    assert head is wte or head.scale is wte.scale  # the int4 kernel re-packs its copy
    assert torch.equal(back(ids).logits, q(ids).logits)
    assert theoretical_size(back) == theoretical_size(q)


def test_gpt2_float_head_and_embedding_stay_one_parameter(gpt2: type, tmp_path: Path) -> None:
    recipe = Recipe(INT8, rules=(Rule("lm_head", None), Rule("transformer.wte", None)))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    q = quantize(gpt2(0), recipe, data=[ids])
    path = save(q, tmp_path / "gpt2.lowbit")
    assert read_header(path).ties == {"lm_head.weight": "transformer.wte.weight"}
    back = load(path, gpt2(5))
    assert back.lm_head.weight is back.transformer.wte.weight
    assert torch.equal(back(ids).logits, q(ids).logits)
