"""The CLI on a transformers checkpoint folder: quantize --model hf:DIR, eval with dict batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.cli import main

transformers = pytest.importorskip("transformers")

BATCHES = """
import torch

def batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
"""


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
    )
    target = tmp_path / "bert"
    transformers.BertModel(cfg).save_pretrained(target)
    (tmp_path / "hfbatches.py").write_text(BATCHES)
    monkeypatch.chdir(tmp_path)
    return target


def test_quantize_and_eval_a_checkpoint_folder(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = folder.parent / "bert.lowbit"
    args = ["quantize", "--model", f"hf:{folder}", "--recipe", "w8a8-dynamic", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    args = ["eval", "--model", f"hf:{folder}", "--quantized", str(out)]
    assert main([*args, "--data", "hfbatches:batches"]) == 0
    text = capsys.readouterr().out
    sqnr = float(text.split("output SQNR")[1].split("dB")[0])
    cosine = float(text.split("cosine")[1].split("against")[0])
    assert sqnr > 20 and cosine > 0.99
    assert "top-1" not in text  # no labels in dict batches


def test_hf_folder_errors_are_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.lowbit")
    weights = ["--weights", "w.pt"]
    assert main(["quantize", "--model", f"hf:{folder}", *weights, "--out", out]) == 2
    assert "drop --weights" in capsys.readouterr().err
    assert main(["quantize", "--model", f"hf:{tmp_path / 'nothing'}", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "Traceback" not in err
