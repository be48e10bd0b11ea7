"""transformers checkpoints as users have them: a save_pretrained folder in, a file that
rebuilds the model alone out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.export.header import read_header
from lowbit.export.hf import HFError, load_pretrained

transformers = pytest.importorskip("transformers")


def _gpt2(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def test_a_saved_transformers_model_loads_from_the_file_alone(tmp_path: Path) -> None:
    float_model = load_pretrained(_gpt2(tmp_path))
    assert float_model.lm_head.weight is float_model.transformer.wte.weight  # tied as saved
    ids = torch.randint(0, 64, (2, 8))
    q = lowbit.quantize(float_model, "w8a8-dynamic")
    path = lowbit.save(q, tmp_path / "gpt2.lowbit")
    header = read_header(path)
    assert header.model is not None and header.model["architecture"] == "GPT2LMHeadModel"
    back = lowbit.load(path)  # no model: transformers builds it from the stored config
    assert type(back).__name__ == "GPT2LMHeadModel" and not back.training
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_a_plain_torch_file_still_needs_its_model(tmp_path: Path) -> None:
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a16")
    path = lowbit.save(q, tmp_path / "m.lowbit")
    with pytest.raises(lowbit.CheckpointError, match="pass the float model"):
        lowbit.load(path)


def test_pickled_checkpoints_and_remote_code_are_refused(tmp_path: Path) -> None:
    folder = _gpt2(tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.rename(folder / "pytorch_model.bin")
    with pytest.raises(HFError, match="pickle lowbit will not load"):
        load_pretrained(folder)
    (tmp_path / "none").mkdir()
    with pytest.raises(HFError, match="no config.json"):
        load_pretrained(tmp_path / "none")


def test_a_crafted_model_description_is_refused(tmp_path: Path) -> None:
    from lowbit.export.hf import build_from_source

    config = {"model_type": "gpt2", "auto_map": {"AutoModel": "evil.Model"}}
    for source, message in [
        ({"library": "transformers", "architecture": "os", "config": {}}, "not a model class"),
        ({"library": "transformers", "architecture": "__import__", "config": {}}, "not a model"),
        ({"library": "transformers", "architecture": "GPT2Model", "config": config}, "remote"),
        ({"library": "other", "architecture": "GPT2Model", "config": {}}, "not a transformers"),
    ]:
        with pytest.raises(HFError, match=message):
            build_from_source(source)
    json.dumps(config)  # the description is plain JSON


def test_a_config_bigger_than_the_file_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crafting import craft

    import lowbit.export.hf as hf

    float_model = load_pretrained(_gpt2(tmp_path))
    good = lowbit.save(lowbit.quantize(float_model, "w8a16"), tmp_path / "g.lowbit")
    for key, value, message in [
        ("n_positions", 50_000_000, "larger than everything the file holds"),
        ("n_layer", 100_000, "more layers than the file has tensors"),
    ]:

        def edit(meta: dict, key: str = key, value: int = value) -> None:
            meta["model"]["config"][key] = value

        crafted = craft(good, tmp_path / f"{key}.lowbit", header=edit)  # checksum re-signed
        with monkeypatch.context() as m:
            m.setattr(hf, "params_on_meta", lambda: pytest.fail("built before the check"))
            with pytest.raises(lowbit.CheckpointError, match=message):
                lowbit.load(crafted)
