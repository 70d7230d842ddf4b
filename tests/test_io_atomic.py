"""Atomic directory writes: the old directory or the new one, never a half-written one."""

from __future__ import annotations

import pytest

from lmforge.io.atomic import atomic_directory


def test_a_completed_block_replaces_the_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        assert staging != target and staging.parent == tmp_path
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # nothing changes before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind


def test_a_failed_block_leaves_the_directory_untouched(tmp_path):
    target = tmp_path / "nested" / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list((tmp_path / "nested").iterdir()) == []
