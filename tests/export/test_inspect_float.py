"""lowbit inspect shows what a file keeps in float, by size, with the reason."""

from __future__ import annotations

from pathlib import Path

import torch

import lowbit


def test_inspect_lists_float_leftovers_with_their_reason(tmp_path: Path) -> None:
    from lowbit.config import Recipe, load_recipe
    from lowbit.export import summarize
    from lowbit.export.summary import format_inspect

    net = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)
    )
    data = load_recipe("w8a16").to_dict()
    data["rules"] = [{"match": "2", "config": None}]
    path = lowbit.save(lowbit.quantize(net, Recipe.from_dict(data)), tmp_path / "m.lowbit")
    summary = summarize(path)
    assert [row.name for row in summary.rows] == ["0"]
    floats = {row.name: row for row in summary.float_rows}
    assert floats["2"].bytes == (64 * 8 + 8) * 4 and "recipe rule" in floats["2"].reason
    assert floats["1"].dtype == "float32" and "not a layer lowbit quantizes" in floats["1"].reason
    text = format_inspect(path, width=200)
    assert "recipe rule" in text and "LayerNorm" not in text  # the file names no classes
