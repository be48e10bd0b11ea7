"""QEmbedding: weight-only tables, row gathers that never rebuild the float table, recipes'
``embedding:`` sections, and save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, Recipe, RecipeError, load_recipe
from lowbit.nn import QEmbedding, QTensor
from lowbit.nn.embedding import gather_rows
from lowbit.spec import QuantSpec, SpecError


class Tagger(nn.Module):
    """Token embedding with a padding row, then a Linear head."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=3)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _ids(vocab: int = 40, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 3  # the padding index
    return ids


def _model(vocab: int = 40, dim: int = 16) -> Tagger:
    torch.manual_seed(0)
    return Tagger(vocab, dim).eval()


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w8a16"])
def test_int8_table_is_close_to_float_and_keeps_the_padding_row(recipe: str) -> None:
    model, ids = _model(), _ids()
    q = lowbit.quantize(model, recipe, data=[_ids(seed=2)])
    embed = q.embed
    assert isinstance(embed, QEmbedding) and embed.input_quantizer is None
    assert isinstance(embed.weight, QTensor) and embed.weight.qdata.dtype == torch.int8
    assert embed.weight.spec == QuantSpec("int8", "per_channel")  # one scale per row
    assert embed.kernel_name == "gather"
    with torch.no_grad():
        want, got = model.embed(ids), embed(ids)
    assert got.dtype == torch.float32 and got.shape == (4, 9, 16)
    assert lowbit.sqnr_db(want, got) >= 35.0
    assert torch.equal(got[:, 0], torch.zeros(4, 16))  # padding row: exactly zero
    assert lowbit.prepared_info(q).kept_float == {}


@pytest.mark.parametrize("dim", [7, 8])  # odd: rows start mid-byte in the packed int4 table
@pytest.mark.parametrize(
    "spec",
    ["int4:per_channel", "int4:per_group:4", "int2:per_tensor", "int3:per_channel", "int8:"],
)
def test_gather_equals_the_dequantized_table(dim: int, spec: str) -> None:
    dtype, _, gran = spec.partition(":")
    table = torch.randn(13, dim)
    qt = QTensor.quantize(table, QuantSpec(dtype, gran or "per_tensor", symmetric=False))
    idx = torch.tensor([12, 0, 5, 5, 11, 1])
    got = gather_rows(qt, idx, torch.float32)
    assert torch.equal(got, qt.dequantize()[idx])


def test_forward_dequantizes_only_the_rows_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(vocab=40, dim=7)
    q = lowbit.quantize(model, "w4a16")
    assert q.embed.weight.layout_name == "packed"
    reference = q.embed.kernel_for(torch.long)  # prepared before the table is guarded
    want = q.embed(_ids())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole table was unpacked or dequantized")

    monkeypatch.setattr(QTensor, "dequantize", refuse)
    monkeypatch.setattr(QTensor, "int_repr", refuse)
    assert reference.name == "gather"
    assert torch.equal(q.embed(_ids()), want)


def test_gather_and_reference_kernels_agree_in_bfloat16() -> None:
    model = _model().to(torch.bfloat16)
    q = lowbit.quantize(model, "w4a8", data=[_ids(seed=2)])
    ids = _ids()
    fast = q.embed(ids)
    q.embed.set_kernel("reference")
    assert q.embed.kernel_name == "reference"
    slow = q.embed(ids)
    assert fast.dtype == slow.dtype == torch.bfloat16
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "w4a8"])
def test_save_load_gives_identical_outputs_and_a_smaller_file(recipe: str, tmp_path: Path) -> None:
    model = _model(vocab=1000, dim=64)  # the table dominates the file
    q = lowbit.quantize(model, recipe, data=[_ids(1000, seed=2)])
    path = lowbit.save(q, tmp_path / "m.lowbit")
    back = lowbit.load(path, _model(vocab=1000, dim=64))
    ids = _ids(1000)
    assert isinstance(back.embed.weight, QTensor)
    assert torch.equal(back.embed.weight.int_repr(), q.embed.weight.int_repr())
    assert torch.equal(back(ids), q(ids))
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = 0.35 if recipe == "w8a8" else 0.22  # 8 or 4 bits + scales + header
    assert path.stat().st_size < limit * float_bytes


def test_out_of_range_and_float_indices_are_refused() -> None:
    q = lowbit.quantize(_model(), "w8a16")
    with pytest.raises(IndexError, match="index 40 is out of range for an embedding of 40 rows"):
        q.embed(torch.tensor([1, 40]))
    with pytest.raises(IndexError, match="index -1 is out of range"):
        q.embed(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="takes integer indices"):
        q.embed(torch.tensor([1.0, 2.0]))


def test_max_norm_stays_float_with_its_reason() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    q = lowbit.quantize(model, "w8a16")
    assert isinstance(q[0], nn.Embedding) and not isinstance(q[0], QEmbedding)
    assert "max_norm=1.0 renormalises" in lowbit.prepared_info(q).kept_float["0"]


def test_recipe_without_an_embedding_section_keeps_them_float() -> None:
    recipe = Recipe(QuantConfig(weight=QuantSpec("int8", "per_channel")))
    q = lowbit.quantize(_model(), recipe)
    assert not isinstance(q.embed, QEmbedding)
    assert "no embedding: section" in lowbit.prepared_info(q).kept_float["embed"]


def test_embedding_section_must_be_weight_only() -> None:
    data = load_recipe("w8a8").to_dict()
    data["embedding"] = {"weight": {"dtype": "int8"}, "input": {"dtype": "int8"}}
    with pytest.raises(
        RecipeError, match=r"recipe.embedding: embeddings are quantized weight-only"
    ):
        Recipe.from_dict(data)
    data["embedding"] = {"weight": {"dtype": "int8"}, "inputs": None}
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['inputs'\]"):
        Recipe.from_dict(data)
    data["embedding"] = {"weight": {"dtype": "int4", "granularity": "per_group:8"}}
    assert Recipe.from_dict(data).embedding == QuantConfig(weight=QuantSpec("int4", "per_group:8"))
    assert Recipe.from_yaml(Recipe.from_dict(data).to_yaml()) == Recipe.from_dict(data)


def test_a_rule_with_an_input_spec_cannot_reach_an_embedding() -> None:
    w8a8 = load_recipe("w8a8").to_dict()
    w8a8["rules"] = [{"match": "*", "config": w8a8["default"]}]
    with pytest.raises(RecipeError, match=r"gives the embedding 'embed' an input spec"):
        lowbit.prepare(_model(), Recipe.from_dict(w8a8))
    weight_only = {"weight": {"dtype": "int4", "granularity": "per_channel"}}
    w8a8["rules"].insert(0, {"match": "embed", "config": weight_only})
    q = lowbit.prepare(_model(), Recipe.from_dict(w8a8))
    assert q.embed.weight_quantizer.spec.dtype.bits == 4  # the rule, not the embedding section


def test_from_float_refuses_an_input_spec() -> None:
    with pytest.raises(SpecError, match="an embedding's input is indices"):
        QEmbedding.from_float(nn.Embedding(4, 2), QuantSpec("int8"), QuantSpec("int8"))


@pytest.mark.parametrize("name", sorted(lowbit.list_recipes()))
def test_every_shipped_recipe_quantizes_embeddings_weight_only(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.embedding is not None and recipe.embedding.input is None
    bits = recipe.embedding.weight.dtype.bits
    # 8-bit recipes keep 8-bit tables, w3 ones 3-bit; below that tables stay at 4 bits
    assert bits == {"w8": 8, "w3": 3}.get(name[:2], 4)
