"""Labelled patches in ImageFolder layout (`DIR/0/*.jpg`, `DIR/1/*.jpg`), from a folder or straight from a tar.

PCam's tars (`data/train/{0,1}/*.jpg`) are read without extracting: every member's JPEG bytes are held in memory
(about 5 KB each) and decoded on access, so 20,000 patches cost ~100 MB, not 550 MB of pixels. The label is the
name of the member's parent folder (`0` or `1`).
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from wsi_vssm.errors import UsageError, one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LABELS = ("0", "1")
NOT_A_SOURCE = "neither a folder nor a tar archive of patches (ImageFolder layout: 0/, 1/)"


class PatchDataError(UsageError):
    """A patch source that cannot be read (missing, empty, no `0`/`1` folders, an undecodable image)."""


@dataclass(frozen=True)
class PatchItem:
    name: str  # path inside the folder or tar
    label: int
    data: bytes | None  # encoded image (tar sources); None: read `name` from `root` on access


class PatchDataset(torch.utils.data.Dataset):
    """Items -> (uint8 (H, W, 3) numpy RGB, int label). `items` as from `scan_source`."""

    def __init__(self, items: list[PatchItem], root: Path | None = None, source: str = ""):
        self.items, self.root, self.source = list(items), root, source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        it = self.items[i]
        try:
            raw = it.data if it.data is not None else (self.root / it.name).read_bytes()
            with Image.open(io.BytesIO(raw)) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except UnidentifiedImageError as e:  # its message names a BytesIO object, not the file
            what = "empty file" if not raw else "not an image Pillow can read"
            raise PatchDataError(f"{self.source}: cannot decode {it.name}: {what}") from e
        except OSError as e:
            raise PatchDataError(f"{self.source}: cannot decode {it.name}: {e}") from e
        return rgb, it.label

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    def subset(self, idx) -> PatchDataset:
        return PatchDataset([self.items[int(i)] for i in idx], self.root, self.source)

    def readable(self) -> PatchDataset:
        """Without the patches that cannot be decoded (each is decoded once: about 0.1 ms for a PCam patch), with
        one warning naming them, so one damaged file does not stop a training run hours in. None left: an error."""
        bad: dict[str, str] = {}  # name -> the decoder's complaint
        for i, it in enumerate(self.items):
            try:
                self[i]
            except PatchDataError as e:
                bad[it.name] = str(e).removeprefix(f"{self.source}: cannot decode ")
        if not bad:
            return self
        first = list(bad.values())
        if len(bad) == len(self):
            raise PatchDataError(f"{self.source}: none of its {len(self)} patches can be decoded ({first[0]})")
        shown = "; ".join(first[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"{self.source}: {len(bad)} of {len(self)} patches cannot be decoded and are left out: {shown}",
                      UserWarning, stacklevel=2)
        return PatchDataset([it for it in self.items if it.name not in bad], self.root, self.source)


def _label_of(name: str) -> int | None:
    parts = Path(name).parts
    if len(parts) < 2 or not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    return int(parts[-2]) if parts[-2] in LABELS else None


def _scan_tar(path: Path) -> list[PatchItem]:
    items = []
    try:
        tar = tarfile.open(path)  # noqa: SIM115 (closed below: its own errors are told apart from the members')
    except tarfile.ReadError as e:  # its text lists each compression tried, one line each
        raise PatchDataError(f"{path}: {NOT_A_SOURCE}") from e
    except (tarfile.TarError, OSError) as e:
        raise PatchDataError(f"cannot read tar {path}: {one_line(getattr(e, 'strerror', None) or e)}") from e
    try:
        with tar:
            for m in tar:
                label = _label_of(m.name) if m.isfile() else None
                if label is not None:
                    items.append(PatchItem(m.name, label, tar.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:  # a cut or damaged archive
        raise PatchDataError(f"cannot read tar {path}: {one_line(e)}") from e
    return items


def _scan_dir(path: Path) -> list[PatchItem]:
    items = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path)
            label = _label_of(rel)
            if label is not None:
                items.append(PatchItem(rel, label, None))
    return items


def load_patches(source: str | os.PathLike, max_items: int | None = None, seed: int = 0) -> PatchDataset:
    """A folder or tar of `0/`, `1/` patches (at any depth). `max_items`: a seeded class-stratified subset."""
    path = Path(source)
    if not path.exists():
        raise PatchDataError(f"patch source not found: {path}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or device: tarfile would wait on it
        raise PatchDataError(f"{path}: {NOT_A_SOURCE}")
    items = _scan_dir(path) if path.is_dir() else _scan_tar(path)
    if not items:
        raise PatchDataError(f"{path}: no images under folders named 0/ or 1/ (ImageFolder layout)")
    items.sort(key=lambda it: it.name)  # a fixed order whatever the file system or tar order
    ds = PatchDataset(items, path if path.is_dir() else None, str(path))
    if max_items is not None and max_items < len(ds):
        ds = ds.subset(stratified_subset(ds.labels, max_items, seed))
    return ds


def training_patches(source, max_items: int | None = None, seed: int = 0) -> PatchDataset:
    """`load_patches` (or a PatchDataset as it is) without its undecodable patches: what the trainers read."""
    ds = source if isinstance(source, PatchDataset) else load_patches(source, max_items, seed)
    return ds.readable()


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices keeping the class proportions, seeded; sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = int(round(n * len(idx) / len(labels)))
        out.append(rng.permutation(idx)[:take])
    return np.sort(np.concatenate(out))


def split_select_holdout(ds: PatchDataset, seed: int = 0) -> tuple[PatchDataset, PatchDataset]:
    """Halve a validation set, stratified and seeded: one half selects checkpoints, the other is only reported."""
    select = stratified_subset(ds.labels, len(ds) // 2, seed)
    rest = np.setdiff1d(np.arange(len(ds)), select)
    return ds.subset(select), ds.subset(rest)


def select_and_holdout(valid: PatchDataset, valid_select: int | None, seed: int):
    """(selection part, held-back part or None) of validation patches: `valid_select` patches, stratified and
    seeded by `seed`, select; the rest are only reported (None: the seeded halves of `split_select_holdout`)."""
    if valid_select is None:
        return split_select_holdout(valid, seed)
    if valid_select >= len(valid):
        return valid, None
    idx = stratified_subset(valid.labels, valid_select, seed)
    return valid.subset(idx), valid.subset(np.setdiff1d(np.arange(len(valid)), idx))


def collate_uint8(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[(HxWx3 uint8, label)] -> (B, 3, H, W) uint8, (B,) float labels."""
    imgs = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).contiguous()
    return imgs, torch.tensor([b[1] for b in batch], dtype=torch.float32)
