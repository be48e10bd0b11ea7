"""lowbit as a new user meets it: 20+ architectures, three recipes, every step checked.

    .venv/bin/python -m benchmarks.architectures [--only NAME ...] [--recipes w8a8 ...]

For each architecture (transformers models built from small configs, and torch models made of
LSTM, GRU, Conv3d, ConvTranspose, Conv1d and nn.TransformerEncoder layers) and each recipe
(``w8a8``, ``w8a8-dynamic``, ``w4a16``): quantize (calibrated on random inputs of the model's
kind), run, save, load (transformers models from the file alone, others into a fresh copy) and
compare outputs bit for bit. Each row shows the share of parameters stored quantized
(embeddings included; ``lowbit.summary``), the file against the real FP32 checkpoint
(safetensors, tied tensors once), the output SQNR against FP32 next to torchao's on the same
model and inputs (int8 dynamic for the 8-bit recipes, int4 weight-only for ``w4a16``), and
eager latency against FP32 (interleaved, median). A failure is a row that says what failed.
Writes benchmarks/results/architectures.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
from benchmarks.harness import RESULTS, machine, setup, time_interleaved
from lowbit.export import write_json
from lowbit.report.evaluate import output_tensor

RECIPES = ("w8a8", "w8a8-dynamic", "w4a16")
Batch = Any


@dataclass
class Arch:
    """A model to try: how to build it (seeded), its inputs, and whether transformers made it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Batch]  # seed -> one batch
    hf: bool = False


@dataclass
class Result:
    """One architecture x recipe."""

    arch: str
    recipe: str
    ok: bool
    identical_after_load: bool | None = None
    quantized_share: float | None = None
    file_bytes: int | None = None
    fp32_checkpoint_bytes: int | None = None
    sqnr_db: float | None = None
    torchao_sqnr_db: float | None = None
    ms: float | None = None
    fp32_ms: float | None = None
    kept_float: str = ""
    error: str = ""


# --- the models -------------------------------------------------------------------------------


def _tokens(vocab: int, seq: int = 16, batch: int = 2) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make


def _seq2seq(vocab: int, seq: int = 12, batch: int = 2) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "decoder_input_ids": torch.randint(0, vocab, (batch, seq // 2), generator=g),
        }

    return make


def _tensor(*shape: int, key: str | None = None) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        return {key: x} if key else x

    return make


def _hf(name: str, model_cls: str, config_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


class LSTMTagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.rnn = nn.LSTM(32, 48, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(96, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class GRUNet(nn.Module):
    """GRU over feature frames -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(40, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class UNet(nn.Module):
    """A two-level U-Net: Conv2d down, ConvTranspose2d up, skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.enc2(a)
        return self.out(self.dec(torch.cat([self.up(b), a], dim=1)))


def _conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _audio_conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=4),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, groups=32),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


class TextTransformer(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().eval()

    return build


def _ids(vocab: int, shape: tuple[int, ...]) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))

    return make


def architectures() -> list[Arch]:
    """Every architecture the script tries."""
    tiny = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    return [
        Arch(
            "BERT",
            _hf("bert", "BertModel", "BertConfig", num_hidden_layers=2, vocab_size=200, **tiny),
            _tokens(200),
            True,
        ),
        Arch(
            "DistilBERT",
            _hf(
                "distilbert",
                "DistilBertModel",
                "DistilBertConfig",
                n_layers=2,
                dim=64,
                n_heads=4,
                hidden_dim=128,
                vocab_size=200,
            ),
            _tokens(200),
            True,
        ),
        Arch(
            "GPT-2",
            _hf(
                "gpt2",
                "GPT2LMHeadModel",
                "GPT2Config",
                n_layer=2,
                n_embd=64,
                n_head=4,
                vocab_size=200,
                n_positions=64,
            ),
            _tokens(200),
            True,
        ),
        Arch(
            "Llama",
            _hf(
                "llama",
                "LlamaForCausalLM",
                "LlamaConfig",
                num_hidden_layers=2,
                num_key_value_heads=2,
                vocab_size=200,
                tie_word_embeddings=True,
                **tiny,
            ),
            _tokens(200),
            True,
        ),
        Arch(
            "T5",
            _hf(
                "t5",
                "T5ForConditionalGeneration",
                "T5Config",
                num_layers=2,
                d_model=64,
                d_kv=16,
                num_heads=4,
                d_ff=128,
                vocab_size=200,
            ),
            _seq2seq(200),
            True,
        ),
        Arch(
            "BART",
            _hf(
                "bart",
                "BartForConditionalGeneration",
                "BartConfig",
                encoder_layers=2,
                decoder_layers=2,
                d_model=64,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                vocab_size=200,
                max_position_embeddings=64,
            ),
            _seq2seq(200),
            True,
        ),
        Arch(
            "ViT",
            _hf(
                "vit",
                "ViTModel",
                "ViTConfig",
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                **tiny,
            ),
            _tensor(2, 3, 32, 32, key="pixel_values"),
            True,
        ),
        Arch(
            "CLIP",
            _hf(
                "clip",
                "CLIPModel",
                "CLIPConfig",
                text_config={"num_hidden_layers": 2, "vocab_size": 200, **tiny},
                vision_config={"num_hidden_layers": 2, "image_size": 32, "patch_size": 8, **tiny},
                projection_dim=32,
            ),
            _clip_inputs,
            True,
        ),
        Arch(
            "Whisper",
            _hf(
                "whisper",
                "WhisperForConditionalGeneration",
                "WhisperConfig",
                encoder_layers=2,
                decoder_layers=2,
                d_model=64,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                vocab_size=200,
                num_mel_bins=16,
                max_source_positions=32,
                max_target_positions=32,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                suppress_tokens=[],
                begin_suppress_tokens=[],
            ),
            _whisper_inputs,
            True,
        ),
        Arch(
            "Wav2Vec2",
            _hf(
                "wav2vec2",
                "Wav2Vec2Model",
                "Wav2Vec2Config",
                num_hidden_layers=2,
                conv_dim=(32, 32),
                conv_stride=(5, 2),
                conv_kernel=(10, 3),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4,
                **tiny,
            ),
            _tensor(2, 1600, key="input_values"),
            True,
        ),
        Arch(
            "ConvNeXt",
            _hf(
                "convnext",
                "ConvNextModel",
                "ConvNextConfig",
                hidden_sizes=[16, 32],
                depths=[1, 1],
                num_stages=2,
                image_size=32,
            ),
            _tensor(2, 3, 32, 32, key="pixel_values"),
            True,
        ),
        Arch(
            "ResNet (HF)",
            _hf(
                "resnet",
                "ResNetModel",
                "ResNetConfig",
                hidden_sizes=[16, 32],
                depths=[1, 1],
                embedding_size=16,
            ),
            _tensor(2, 3, 32, 32, key="pixel_values"),
            True,
        ),
        Arch("LSTM tagger", _seeded(LSTMTagger), _ids(100, (4, 20))),
        Arch("GRU", _seeded(GRUNet), _tensor(4, 25, 40)),
        Arch("Conv3d", _seeded(_conv3d), _tensor(2, 1, 8, 16, 16)),
        Arch("U-Net", _seeded(UNet), _tensor(2, 3, 32, 32)),
        Arch("Conv1d audio", _seeded(_audio_conv1d), _tensor(4, 1, 800)),
        Arch("TransformerEncoder", _seeded(TextTransformer), _ids(100, (4, 16))),
        Arch(
            "MLP",
            _seeded(lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))),
            _tensor(8, 64),
        ),
        Arch("SmallResNet", _seeded(_small_resnet), _tensor(8, 1, 28, 28)),
    ]


def _small_resnet() -> nn.Module:
    from lowbit.data.zoo import SmallResNet

    return SmallResNet()


def _clip_inputs(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (2, 10), generator=g)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _whisper_inputs(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_features": torch.randn(2, 16, 64, generator=g),
        "decoder_input_ids": torch.randint(0, 200, (2, 6), generator=g),
    }


# --- one row ----------------------------------------------------------------------------------


def _run(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return output_tensor(out).float()


def _fp32_checkpoint_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fp32.safetensors"
        st.save_model(model, str(path))  # shared (tied) tensors written once
        return path.stat().st_size


def _torchao_sqnr(
    model: nn.Module, recipe: str, batch: Batch, reference: torch.Tensor
) -> float | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    q = copy.deepcopy(model)
    try:
        if recipe == "w4a16":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            q = q.to(torch.bfloat16)
            quantize_(q, PrototypeInt4WeightOnlyConfig(group_size=32))
            cast = (
                {
                    k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
                    for k, v in batch.items()
                }
                if isinstance(batch, dict)
                else batch.to(torch.bfloat16)
                if batch.is_floating_point()
                else batch
            )
            out = _run(q, cast)
        else:
            quantize_(q, Int8DynamicActivationInt8WeightConfig())
            out = _run(q, batch)
    except Exception:  # noqa: BLE001  # torchao refusing a model is a "—", not a crash
        return None
    if torch.equal(out, reference):  # torchao found no layer it quantizes (convolutions)
        return None
    return float(lowbit.sqnr_db(reference, out))


def _load_back(arch: Arch, path: Path) -> nn.Module:
    if arch.hf:
        try:
            return lowbit.load(path)  # type: ignore[call-arg]  # rebuilt from the stored config
        except TypeError:
            pass
    return lowbit.load(path, arch.build())


def _recipe(name: str, float_embeddings: bool) -> lowbit.Recipe:
    """A shipped recipe, with ``embedding: null`` when embeddings should stay float (what
    torchao's rows do: it quantizes nn.Linear layers only)."""
    recipe = lowbit.load_recipe(name)
    if not float_embeddings:
        return recipe
    return lowbit.Recipe.from_dict({**recipe.to_dict(), "embedding": None})


def try_one(arch: Arch, recipe: str, timing_runs: int, float_embeddings: bool = False) -> Result:
    """Quantize, run, save, load and compare one architecture with one recipe."""
    result = Result(arch.name, recipe, ok=False)
    stage = "build"
    try:
        model = arch.build()
        batch = arch.inputs(1)
        calibration = [arch.inputs(seed) for seed in range(2, 6)]
        stage = "quantize"
        reference = _run(model, batch)
        result.fp32_checkpoint_bytes = _fp32_checkpoint_bytes(model)
        q = lowbit.quantize(model, _recipe(recipe, float_embeddings), data=calibration)
        stage = "run"
        out = _run(q, batch)
        result.sqnr_db = float(lowbit.sqnr_db(reference, out))
        summary = lowbit.summary(q)
        result.quantized_share = summary.quantized_share
        biggest = sorted(
            (row for row in summary.layers if not row.quantized), key=lambda r: -r.bytes
        )
        result.kept_float = "; ".join(
            f"{row.name or '(model)'} {row.bytes / 1024:.0f} KiB: {row.note}" for row in biggest[:2]
        )
        stage = "save"
        with tempfile.TemporaryDirectory() as folder:
            path = lowbit.save(q, Path(folder) / "model.lowbit")
            result.file_bytes = path.stat().st_size
            stage = "load"
            back = _load_back(arch, path)
        stage = "run after load"
        result.identical_after_load = torch.equal(_run(back, batch), out)
        stage = "torchao"
        result.torchao_sqnr_db = _torchao_sqnr(model, recipe, batch, reference)
        stage = "timing"
        times = time_interleaved(
            {"fp32": lambda: _run(model, batch), "lowbit": lambda: _run(q, batch)},
            warmup=2,
            runs=timing_runs,
        )
        result.fp32_ms, result.ms = times["fp32"], times["lowbit"]
        result.ok = bool(result.identical_after_load)
        if not result.ok:
            result.error = "outputs differ after load"
    except Exception as err:  # noqa: BLE001  # a failing architecture is a row, not a crash
        last = traceback.extract_tb(err.__traceback__)[-1]
        first = (str(err).splitlines() or [""])[0][:160]
        where = f"{Path(last.filename).name}:{last.lineno}"
        result.error = f"{stage}: {type(err).__name__}: {first} ({where})"
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[Result]) -> Table:
    """The results as a rich table."""
    out = Table(title="architectures")
    for column in (
        "architecture",
        "recipe",
        "ok",
        "quantized",
        "file / fp32",
        "SQNR dB",
        "torchao dB",
        "ms",
        "× fp32",
        "note",
    ):
        out.add_column(column)
    for r in results:
        ratio = (
            r.file_bytes / r.fp32_checkpoint_bytes
            if r.file_bytes and r.fp32_checkpoint_bytes
            else None
        )
        speed = r.fp32_ms / r.ms if r.ms and r.fp32_ms else None
        out.add_row(
            r.arch,
            r.recipe,
            "yes" if r.ok else "NO",
            _fmt(r.quantized_share and 100 * r.quantized_share, ".1f")
            + ("%" if r.quantized_share is not None else ""),
            _fmt(ratio, ".3f"),
            _fmt(r.sqnr_db, ".1f"),
            _fmt(r.torchao_sqnr_db, ".1f"),
            _fmt(r.ms, ".2f"),
            _fmt(speed, ".2f"),
            r.error or r.kept_float,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architecture names to try (default: all)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--runs", type=int, default=10, help="timed rounds per row")
    parser.add_argument(
        "--float-embeddings",
        action="store_true",
        help="keep embeddings float (as torchao does), to compare SQNR like for like; "
        "writes architectures-float-embeddings.json",
    )
    args = parser.parse_args(argv)
    setup()
    results = []
    for arch in architectures():
        if args.only and arch.name not in args.only:
            continue
        for recipe in args.recipes:
            result = try_one(arch, recipe, args.runs, args.float_embeddings)
            print(
                f"{arch.name:20s} {recipe:14s} {'ok' if result.ok else 'FAIL'} {result.error}",
                flush=True,
            )
            results.append(result)
    Console(width=200).print(table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-float-embeddings" if args.float_embeddings else ""
    path = RESULTS / f"architectures{suffix}.json"
    write_json(path, {"machine": machine(), "rows": [asdict(r) for r in results]})
    print(f"wrote {path}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} rows pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
