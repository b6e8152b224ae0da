"""Preparing an asset folder: built aside, swapped in whole, and a failed build changes nothing."""

from __future__ import annotations

import pytest

from ray_align.assets import replaced_folder


def test_replaced_folder_swaps_in_the_new_contents(tmp_path):
    target = tmp_path / "asset"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with replaced_folder(target) as staging:
        assert staging != target and staging.is_dir() and not any(staging.iterdir())
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # readers see the old folder until the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not staging.exists()


def test_replaced_folder_keeps_the_old_one_when_the_build_fails(tmp_path):
    target = tmp_path / "asset"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (tmp_path / "asset.tmp").mkdir()  # a staging folder left by an earlier crash
    (tmp_path / "asset.tmp" / "stale.txt").write_text("stale")
    with pytest.raises(RuntimeError, match="build failed"), replaced_folder(target) as staging:
        assert not (staging / "stale.txt").exists()
        (staging / "half.txt").write_text("half")
        raise RuntimeError("build failed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert not staging.exists()


def test_replaced_folder_creates_a_missing_target(tmp_path):
    target = tmp_path / "deeper" / "asset"
    with replaced_folder(target) as staging:
        (staging / "file").write_text("x")
    assert (target / "file").read_text() == "x"
