"""Patch fingerprints in a model file: which patches trained and which selected it."""

from __future__ import annotations

import shutil

import numpy as np
from conftest import write_patch_folder

from wsi_vssm.training.data.fingerprints import HASH, KEY, patch_digests, patch_record, patches_seen
from wsi_vssm.training.data.patches import load_patches


def test_a_patch_is_known_by_its_file_wherever_it_lies(tmp_path):
    write_patch_folder(tmp_path / "a", 3, seed=0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "0" / "p0.jpg").rename(tmp_path / "b" / "0" / "renamed.jpg")
    a, b = load_patches(tmp_path / "a"), load_patches(tmp_path / "b")
    assert sorted(patch_digests(a)) == sorted(patch_digests(b))  # copied and renamed: the same patches
    assert len(set(patch_digests(a).tolist())) == 6
    write_patch_folder(tmp_path / "c", 3, seed=1)
    assert not np.isin(patch_digests(load_patches(tmp_path / "c")), patch_digests(a)).any()


def test_the_record_is_the_union_over_stages_and_counts_what_it_holds():
    first = patch_record(np.array([5, 1, 3], np.uint64), np.array([9], np.uint64))
    assert first["hash"] == HASH and len(first["train"]) == 3 * 8 and len(first["select"]) == 8
    later = patch_record(np.array([3, 7], np.uint64), np.array([11], np.uint64), previous=first)  # from `first`
    meta = {KEY: later}
    assert patches_seen(np.array([1, 7, 9, 11, 42], np.uint64), meta) == {"trained": 2, "selected": 2, "either": 4}
    assert patches_seen(np.array([3], np.uint64), {KEY: first}) == {"trained": 1, "selected": 0, "either": 1}
    # a file without a record (older files, other trainers) or with another kind of digest says nothing
    assert patches_seen(np.array([1], np.uint64), {}) is None and patches_seen(np.array([1], np.uint64), None) is None
    assert patches_seen(np.array([1], np.uint64), {KEY: {**later, "hash": "md5"}}) is None
    assert patch_record(np.array([2], np.uint64), np.array([4], np.uint64), previous={"hash": "md5"})["train"] == (
        np.array([2], "<u8").tobytes())


def test_repeated_patches_counts_copies_and_shows_a_conflict():
    from wsi_vssm.training.data.fingerprints import repeated_patches

    assert repeated_patches([1, 2, 3], [0, 1, 1], ["a", "b", "c"]) is None
    rep = repeated_patches([5, 5, 5, 5, 7, 7, 9], [0, 0, 0, 1, 1, 1, 0],
                           ["0/a", "0/b", "0/c", "1/d", "1/e", "1/f", "0/g"])
    assert (rep["groups"], rep["repeats"], rep["conflicting_labels"]) == (2, 4, 1)
    # three copies in 0/ came first: the example still shows the one in 1/, or it would not show the conflict
    assert rep["example"] == ["0/a", "1/d", "0/b"]
