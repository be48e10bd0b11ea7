"""transformers models built from tiny configs: quantize, run close to float, generate, save/load.

ViTModel, CLIPModel and T5ForConditionalGeneration in float32 and a LlamaForCausalLM cast to
bfloat16, each through ``w8a8`` (static, calibrated on dict batches), ``w8a8-dynamic`` and
``w4a16``. Nothing is downloaded: every model is built from a config with a fixed seed, small
enough (hidden 64, two layers, vocabulary 64, eight tokens) for the whole file to run in
seconds. Each model is quantized once per recipe and shared by the tests below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import QModule, QTensor

transformers = pytest.importorskip("transformers")

RECIPES = ("w8a8", "w8a8-dynamic", "w4a16")
CASES = ("vit", "clip", "t5", "llama")
VOCAB = 64
SEQ = 8
BATCH = 2
IMAGE = 32  # pixels a side, patches of 8: 16 patches + CLS
HIDDEN = 64
FFN = 128
LAYERS = 2

# Floors on the SQNR (dB) of the main outputs against the float model. int8 per-channel weights
# with int8 activations (static or per batch) cost about 40 dB per Linear; through two blocks
# of these random tiny models (softmax, layer norms, residual adds; Llama in bfloat16) the end
# to end figures measured 27.6-37.1 dB. 20 dB (noise at 1% of the signal power) leaves room for
# another CPU's kernels, yet fails a model whose weight scales are all 25% off (6-18 dB when
# tried). int4 weights in groups of 32 cost about 20 dB per Linear and measured 12.6-18.9 dB end
# to end (CLIP's causal text tower lowest); 10 dB fails a model that lost its int4 zero points
# (-4 to 8 dB when tried). Leaving the quantized layers out entirely scores 5.2 dB at most.
MIN_SQNR_DB = {"w8a8": 20.0, "w8a8-dynamic": 20.0, "w4a16": 10.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run this file on one intra-op thread. These models are too small to gain from two, and
    on a busy 2-core machine every op torch splits between threads (rounding of a few thousand
    elements already is) waits a scheduler slice for the descheduled one: the MSE observers'
    search made the file 3 to 4 times slower (70 s instead of 20 s) while another job ran."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    """A float model, how to build a fresh one, its calibration batches and a test batch."""

    name: str
    build: Callable[[int], nn.Module]  # seed -> float model in eval mode and its final dtype
    model: nn.Module
    calib: list[dict[str, torch.Tensor]]
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]  # the main outputs, compared by SQNR and for equality after load
    linears: int  # nn.Linear layers the architecture has: every one must be quantized
    convs: int  # nn.Conv2d layers (the patch embedding)


def _tokens(gen: torch.Generator, eos: int | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    if eos is not None:
        ids[:, -1] = eos  # CLIP pools its text at the end-of-sequence token
    return {"input_ids": ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _pixels(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)}


def _make_case(
    name: str,
    build: Callable[[int], nn.Module],
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]],
    outputs: tuple[str, ...],
    linears: int,
    convs: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(1234)
    calib = [batch(gen) for _ in range(3)]
    return Case(name, build, build(0), calib, batch(gen), outputs, linears, convs)


@pytest.fixture(scope="module")
def vit() -> Case:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=FFN,
            image_size=IMAGE,
            patch_size=8,
            # at the default 0.02 the two blocks add so little to the patch embeddings that
            # leaving them out altogether still scores 14.5 dB: the SQNR would not see them
            initializer_range=0.1,
        )
        return transformers.ViTModel(config).eval()

    # per layer: query, key, value, attention output, intermediate, output; plus the pooler
    return _make_case("vit", build, _pixels, ("last_hidden_state",), 6 * LAYERS + 1, convs=1)


CLIP_EOS = 2


@pytest.fixture(scope="module")
def clip() -> Case:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        sizes = {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 2,
            "intermediate_size": FFN,
        }
        config = transformers.CLIPConfig(
            text_config={
                **sizes,
                "vocab_size": VOCAB,
                "max_position_embeddings": 16,
                "bos_token_id": 0,
                "eos_token_id": CLIP_EOS,
                "pad_token_id": 1,
            },
            vision_config={**sizes, "image_size": IMAGE, "patch_size": 8},
            projection_dim=16,
        )
        return transformers.CLIPModel(config).eval()

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {**_pixels(gen), **_tokens(gen, eos=CLIP_EOS)}

    # two towers of q, k, v, out_proj, fc1, fc2 per layer; plus the two projections
    return _make_case(
        "clip", build, batch, ("image_embeds", "text_embeds"), 2 * 6 * LAYERS + 2, convs=1
    )


@pytest.fixture(scope="module")
def t5() -> Case:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.T5Config(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=16,
            d_ff=FFN,
            num_layers=LAYERS,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        return transformers.T5ForConditionalGeneration(config).eval()

    def calib_batch(gen: torch.Generator) -> dict[str, torch.Tensor]:  # loss path: labels
        return {**_tokens(gen), "labels": torch.randint(3, VOCAB, (BATCH, 5), generator=gen)}

    gen = torch.Generator().manual_seed(1234)
    calib = [calib_batch(gen) for _ in range(3)]
    inputs = {
        **_tokens(gen),
        "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, 5), generator=gen),
    }
    # encoder: q, k, v, o, wi, wo; decoder: self and cross attention (4 each), wi, wo; lm_head
    linears = 6 * LAYERS + 10 * LAYERS + 1
    return Case("t5", build, build(0), calib, inputs, ("logits",), linears, 0)


@pytest.fixture(scope="module")
def llama() -> Case:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()

    # per layer: q, k, v, o, gate, up, down; plus lm_head
    return _make_case("llama", build, _tokens, ("logits",), 7 * LAYERS + 1)


@pytest.fixture(scope="module")
def quantized_models() -> dict[tuple[str, str], nn.Module]:
    """(case, recipe) -> quantized model: each is quantized once for the whole file."""
    return {}


def _case(request: pytest.FixtureRequest, name: str) -> Case:
    case = request.getfixturevalue(name)
    assert isinstance(case, Case)
    return case


def _quantized(cache: dict[tuple[str, str], nn.Module], case: Case, recipe: str) -> nn.Module:
    key = (case.name, recipe)
    if key not in cache:
        torch.manual_seed(0)
        cache[key] = lowbit.quantize(case.model, recipe, data=case.calib)
    return cache[key]


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {key: out[key] for key in out if isinstance(out[key], torch.Tensor)}


def _counts(model: nn.Module) -> tuple[int, int, int]:
    """(nn.Linear layers, those whose weight is a QTensor, Conv2d layers with a QTensor)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return (
        len(linears),
        sum(isinstance(m.weight, QTensor) for m in linears),
        sum(isinstance(m.weight, QTensor) for m in convs),
    )


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", CASES)
def test_quantizes_every_layer_and_runs_close_to_float(
    request: pytest.FixtureRequest,
    quantized_models: dict[tuple[str, str], nn.Module],
    name: str,
    recipe: str,
) -> None:
    case = _case(request, name)
    q = _quantized(quantized_models, case, recipe)
    assert not any(isinstance(m, QModule) for m in case.model.modules())  # quantize() copies

    total, quantized, convs = _counts(q)
    assert total == case.linears == _counts(case.model)[0]
    assert quantized == case.linears  # every Linear holds integers, none was left in float
    assert convs == case.convs  # the patch embedding too
    assert not [n for n in lowbit.prepared_info(q).notes if "kept in float" in n]
    embeddings = [m for m in q.modules() if isinstance(m, nn.Embedding)]
    assert all(isinstance(m.weight, QTensor) for m in embeddings)  # weight-only, every one
    assert len(lowbit.quantized_layers(q)) == case.linears + case.convs + len(embeddings)

    ref, out = _run(case.model, case.inputs), _run(q, case.inputs)
    for key in case.outputs:
        assert out[key].dtype == ref[key].dtype, key
        assert out[key].shape == ref[key].shape, key
        db = lowbit.sqnr_db(ref[key].float(), out[key].float())
        assert db >= MIN_SQNR_DB[recipe], f"{name} {recipe} {key}: {db:.1f} dB"
        assert not torch.equal(out[key], ref[key])  # the quantized layers did run


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["vit", "clip"])
def test_patch_embedding_dtype_read_still_works(
    request: pytest.FixtureRequest,
    quantized_models: dict[tuple[str, str], nn.Module],
    name: str,
    recipe: str,
) -> None:
    """ViT and CLIP cast pixel_values to ``patch_embedding.weight.dtype`` before the conv."""
    case = _case(request, name)
    q = _quantized(quantized_models, case, recipe)
    if name == "vit":
        conv = q.get_submodule("embeddings.patch_embeddings.projection")
    else:
        conv = q.get_submodule("vision_model.embeddings.patch_embedding")
    assert isinstance(conv.weight, QTensor) and conv.weight.dtype == torch.float32
    pixels = case.inputs["pixel_values"]
    inputs = {**case.inputs, "pixel_values": pixels.double()}  # the model casts it back
    same, out = _run(q, case.inputs), _run(q, inputs)
    for key in case.outputs:
        assert out[key].dtype == torch.float32
        assert torch.equal(out[key], same[key]), key


@pytest.mark.parametrize("recipe", RECIPES)
def test_t5_feed_forward_reads_wo_weight_dtype(
    t5: Case, quantized_models: dict[tuple[str, str], nn.Module], recipe: str
) -> None:
    """T5DenseActDense casts its hidden states to ``wo.weight.dtype`` unless that is int8: the
    quantized wo must read as float32, so a bfloat16 input comes out in float32."""
    q = _quantized(quantized_models, t5, recipe)
    ff = q.get_submodule("encoder.block.0.layer.1.DenseReluDense")
    assert type(ff).__name__ == "T5DenseActDense"
    for layer in (ff.get_submodule("wi"), ff.get_submodule("wo")):
        assert isinstance(layer.weight, QTensor) and layer.weight.dtype == torch.float32
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out32, out16 = ff(hidden), ff(hidden.bfloat16())
    assert out32.dtype == torch.float32
    assert out16.dtype == torch.float32  # cast to wo.weight.dtype before wo, as in float
    # the two differ by the bfloat16 rounding of the input only (41-42 dB measured with int8
    # layers; none with int4, whose kernel rounds its input to bfloat16 anyway)
    assert lowbit.sqnr_db(out32, out16) >= MIN_SQNR_DB[recipe]


def test_llama_stays_bfloat16(
    llama: Case, quantized_models: dict[tuple[str, str], nn.Module]
) -> None:
    for recipe in RECIPES:
        q = _quantized(quantized_models, llama, recipe)
        weights = [m.weight for m in lowbit.quantized_layers(q).values()]
        assert all(isinstance(w, QTensor) and w.dtype == torch.bfloat16 for w in weights)
        assert q.dtype == torch.bfloat16
        assert _run(q, llama.inputs)["logits"].dtype == torch.bfloat16


def _generate(model: Any, case: Case) -> torch.Tensor:
    with torch.no_grad():
        tokens = model.generate(
            input_ids=case.inputs["input_ids"],
            attention_mask=case.inputs["attention_mask"],
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    assert isinstance(tokens, torch.Tensor)
    return tokens


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["t5", "llama"])
def test_generate_greedy(
    request: pytest.FixtureRequest,
    quantized_models: dict[tuple[str, str], nn.Module],
    name: str,
    recipe: str,
) -> None:
    case = _case(request, name)
    q = _quantized(quantized_models, case, recipe)
    tokens = _generate(q, case)
    prompt = case.inputs["input_ids"]
    if name == "t5":  # the decoder starts from decoder_start_token_id
        assert tokens.shape == (BATCH, 1 + 4)
        assert (tokens[:, 0] == 0).all()
    else:  # a decoder-only model returns the prompt, then the new tokens
        assert tokens.shape == (BATCH, SEQ + 4)
        assert torch.equal(tokens[:, :SEQ], prompt)
    assert ((tokens >= 0) & (tokens < VOCAB)).all()
    assert torch.equal(_generate(q, case), tokens)  # greedy: deterministic


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", CASES)
def test_save_load_into_a_fresh_model_gives_identical_outputs(
    request: pytest.FixtureRequest,
    quantized_models: dict[tuple[str, str], nn.Module],
    tmp_path: Path,
    name: str,
    recipe: str,
) -> None:
    case = _case(request, name)
    q = _quantized(quantized_models, case, recipe)
    fresh = case.build(1)  # same config and dtype, other weights: everything comes from the file
    back = lowbit.load(lowbit.save(q, tmp_path / f"{name}.lowbit"), fresh)
    assert not any(isinstance(m, QModule) for m in fresh.modules())  # the caller's model
    assert _counts(back) == _counts(q)
    assert next(back.parameters()).dtype == next(q.parameters()).dtype
    out, want = _run(back, case.inputs), _run(q, case.inputs)
    for key in case.outputs:
        assert torch.equal(out[key], want[key]), key
    if name in ("t5", "llama"):
        assert torch.equal(_generate(back, case), _generate(q, case))


def test_t5_tied_embeddings_stay_tied_after_load(
    t5: Case, quantized_models: dict[tuple[str, str], nn.Module], tmp_path: Path
) -> None:
    q = _quantized(quantized_models, t5, "w4a16")
    shared = q.get_submodule("shared").weight
    assert q.get_submodule("encoder.embed_tokens").weight is shared  # quantize() keeps the tie
    path = lowbit.save(q, tmp_path / "t5.lowbit")
    ties = lowbit.export.read_header(path).ties  # stored once, under one name
    assert ties["encoder.embed_tokens.weight"] == ties["decoder.embed_tokens.weight"]
    assert ties["encoder.embed_tokens.weight"] == "shared.weight"
    back = lowbit.load(path, t5.build(1))
    shared = back.get_submodule("shared").weight
    assert back.get_submodule("encoder.embed_tokens").weight is shared
    assert back.get_submodule("decoder.embed_tokens").weight is shared
