"""Labelled patches in ImageFolder layout (`DIR/0/*.jpg`, `DIR/1/*.jpg`), from a folder or straight from a tar.

PCam's tars (`data/train/{0,1}/*.jpg`) are read without extracting: every member's JPEG bytes are held in memory
(about 5 KB each) and decoded on access, so 20,000 patches cost ~100 MB, not 550 MB of pixels. The label is the
class folder (`0` or `1`) above a member at any depth (`_label_of`).
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
from wsi_vssm.training.data.fingerprints import file_digest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LABELS = ("0", "1")
NOT_A_SOURCE = "neither a folder nor a tar archive of patches (ImageFolder layout: 0/, 1/)"
# A patch is a few KB (PCam: 96 px); these bound what a hostile or mistaken file may cost to read and decode
PATCH_MAX_PIXELS = 8192 * 8192
PATCH_MAX_BYTES = 64 << 20


class PatchDataError(UsageError):
    """A patch source that cannot be read (missing, empty, no `0`/`1` folders, an undecodable image)."""


@dataclass(frozen=True)
class PatchItem:
    name: str  # path inside the folder or tar
    label: int
    data: bytes | None  # encoded image (tar sources); None: read `name` from `root` on access


class PatchDataset(torch.utils.data.Dataset):
    """Items -> (uint8 (H, W, 3) numpy RGB, int label). `items` as `load_patches` lists them."""

    def __init__(self, items: list[PatchItem], root: Path | None = None, source: str = ""):
        self.items, self.root, self.source = list(items), root, source
        self.patch_size: tuple[int, int] | None = None  # (w, h) of every patch, once `readable` has decoded them
        self._digests: np.ndarray | None = None  # `fingerprints.patch_digests`, once computed
        # index -> digest of each file read, kept when a caller sets it to {} (evaluate scores a folder and then
        # hashes it: `patch_digests` need not read the files again); None, training's case, hashes nothing
        self.read_digests: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.decode(i, self.read_raw(i)), self.items[i].label

    def read_raw(self, i: int) -> bytes:
        """Patch i's encoded bytes (its digest kept when `read_digests` is on), not decoded: a resumed evaluation
        needs no pixels of a patch it holds a score of."""
        it = self.items[i]
        try:
            raw = it.data if it.data is not None else (self.root / it.name).read_bytes()
        except OSError as e:
            raise PatchDataError(f"{self.source}: cannot decode {it.name}: {e}") from e
        if self.read_digests is not None:
            self.read_digests[i] = file_digest(raw)
        return raw

    def decode(self, i: int, raw: bytes) -> np.ndarray:
        """Patch i's bytes (`read_raw`) as uint8 (H, W, 3) RGB; PatchDataError naming the file if they are no image."""
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > PATCH_MAX_PIXELS:  # a few KB of PNG may declare gigapixels
                    raise PatchDataError(f"{self.source}: cannot decode {self.items[i].name}: it is {im.width} x "
                                         f"{im.height} px, not a patch (up to {PATCH_MAX_PIXELS:,} px)")
                return _rgb(im)
        except Image.DecompressionBombError as e:  # neither of the two below: it ended runs in a traceback
            raise PatchDataError(f"{self.source}: cannot decode {self.items[i].name}: {e}") from e
        except UnidentifiedImageError as e:  # its message names a BytesIO object, not the file
            what = "empty file" if not raw else "not an image Pillow can read"
            raise PatchDataError(f"{self.source}: cannot decode {self.items[i].name}: {what}") from e
        except OSError as e:
            raise PatchDataError(f"{self.source}: cannot decode {self.items[i].name}: {e}") from e

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    def subset(self, idx) -> PatchDataset:
        idx = [int(i) for i in idx]
        part = PatchDataset([self.items[i] for i in idx], self.root, self.source)
        part.patch_size = self.patch_size
        if self._digests is not None:  # each file is hashed once, whichever part checks it
            part._digests = self._digests[np.asarray(idx, dtype=np.int64)]
        if self.read_digests is not None:
            part.read_digests = {j: self.read_digests[i] for j, i in enumerate(idx) if i in self.read_digests}
        return part

    def readable(self) -> PatchDataset:
        """Without the patches that cannot be decoded (each is decoded once: about 0.1 ms for a PCam patch), with
        one warning naming them, so one damaged file does not stop a training run hours in. None left: an error.
        Patches of another size than the first are an error too (a batch is one array: it failed as a traceback,
        after an epoch when only the validation patches differed)."""
        bad: dict[str, str] = {}  # name -> the decoder's complaint
        sizes: dict[tuple[int, int], str] = {}  # (w, h) -> the first patch of that size
        for i, it in enumerate(self.items):
            try:
                img, _ = self[i]
            except PatchDataError as e:
                bad[it.name] = str(e).removeprefix(f"{self.source}: cannot decode ")
                continue
            sizes.setdefault((img.shape[1], img.shape[0]), it.name)
        if len(sizes) > 1:
            shown = ", ".join(f"{w} x {h} px ({name})" for (w, h), name in list(sizes.items())[:4])
            raise PatchDataError(f"{self.source}: patches of {len(sizes)} sizes: {shown}; training needs one size "
                                 "(crop or resize them to one, e.g. 96 px at about 0.97 um/px as PCam)")
        self.patch_size = next(iter(sizes), None)
        if not bad:
            return self
        first = list(bad.values())
        if len(bad) == len(self):
            raise PatchDataError(f"{self.source}: none of its {len(self)} patches can be decoded ({first[0]})")
        shown = "; ".join(first[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"{self.source}: {len(bad)} of {len(self)} patches cannot be decoded and are left out: {shown}",
                      UserWarning, stacklevel=2)
        kept = PatchDataset([it for it in self.items if it.name not in bad], self.root, self.source)
        kept.patch_size = self.patch_size
        return kept


AMBIGUOUS = -1  # `_label_of` for a patch under both a 0/ and a 1/ folder


def _label_of(name: str) -> int | None:
    """The label of an image at relative path `name`: the class folder (`0/` or `1/`) above it at any depth, so
    subfolders inside a class folder (one per patient or slide) keep its label; AMBIGUOUS under both (folds or
    patients numbered 0 and 1 around the class folders); None for other files, hidden ones and macOS's `._`
    copies (resource forks, not images)."""
    parts = Path(name).parts
    if (len(parts) < 2 or not name.lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith(".")
            or "__MACOSX" in parts):
        return None
    return _class_of(parts[:-1])


def _class_of(folders) -> int | None:
    """The class the folder path `folders` (its parts) lies in: 0 or 1, AMBIGUOUS under both, None under none."""
    found = {p for p in folders if p in LABELS}
    if not found:
        return None
    return int(found.pop()) if len(found) == 1 else AMBIGUOUS


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
                if label is not None and m.size > PATCH_MAX_BYTES:  # read whole: a gzip bomb took gigabytes
                    raise PatchDataError(f"{path}: its member {m.name} is {m.size / 2**20:,.0f} MiB, not a patch (up "
                                         f"to {PATCH_MAX_BYTES >> 20} MiB)")
                if label is not None:
                    items.append(PatchItem(m.name, label, tar.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:  # a cut or damaged archive
        raise PatchDataError(f"cannot read tar {path}: {one_line(e)}") from e
    return items


def _rgb(im: Image.Image) -> np.ndarray:
    """A decoded patch as H x W x 3 uint8. 16-bit and float greys are scaled to 8 bits (Pillow's convert("RGB")
    clips them: a 16-bit grey patch became all white)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im)
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(a, 0, 1) * 255
        elif a.max(initial=0) > 255:  # "I" also holds 8-bit values widened: only scale true 16-bit data
            a = a.astype(np.float64) * (255 / 65535)
        return np.repeat((a + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _scan_dir(path: Path) -> list[PatchItem]:
    items, special = [], []
    seen: dict[str, str] = {}  # real path -> relative path of each folder walked: links are followed, loops are not
    for dirpath, dirs, files in os.walk(path, followlinks=True):
        real, rel_dir = os.path.realpath(dirpath), os.path.relpath(dirpath, path)
        if real in seen:
            first = seen[real]
            if _class_of(Path(first).parts) != _class_of(Path(rel_dir).parts):
                a, b = sorted((rel_dir, first))
                raise PatchDataError(f"{path}: {a}/ and {b}/ are the same folder (a link) under different labels: "
                                     "its patches cannot be both; link each class to its own folder")
            dirs.clear()
            continue
        seen[real] = rel_dir
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path)
            label = _label_of(rel)
            if label is None:
                continue
            full = os.path.join(dirpath, f)
            if os.path.exists(full) and not os.path.isfile(full):  # a named pipe or device: reading it would wait
                special.append(rel)
                continue
            items.append(PatchItem(rel, label, None))  # a dangling link stays: it fails alone, named
    if special:
        warnings.warn(f"{path}: {len(special)} entr(ies) named like images are not regular files (named pipes, "
                      f"devices) and are left out: {', '.join(sorted(special)[:3])}", UserWarning, stacklevel=3)
    return items


def load_patches(source: str | os.PathLike, max_items: int | None = None, seed: int = 0) -> PatchDataset:
    """A folder or tar of `0/`, `1/` patches (at any depth). `max_items`: a seeded class-stratified subset."""
    path = Path(source)
    if not path.exists():
        raise PatchDataError(f"patch source not found: {path}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or device: tarfile would wait on it
        raise PatchDataError(f"{path}: {NOT_A_SOURCE}")
    items = _scan_dir(path) if path.is_dir() else _scan_tar(path)
    ambiguous = sorted(it.name for it in items if it.label == AMBIGUOUS)
    if ambiguous:  # either reading would mislabel half of them without a word
        raise PatchDataError(f"{path}: {len(ambiguous)} image(s) lie under both a 0/ and a 1/ folder (e.g. "
                             f"{ambiguous[0]}), so their label is ambiguous; give the folder that holds the class "
                             "folders 0/ and 1/ (one per fold or patient set)")
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
    if max_items is not None and max_items > len(ds):  # said, as epoch_size and valid_select are
        warnings.warn(f"{ds.source}: max_train {max_items} is more than its {len(ds)} training patches: all of them "
                      "train", UserWarning, stacklevel=2)
    return ds.readable()


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices keeping the class proportions, seeded; sorted. Each class keeps at least one, so a rare class
    can add one past `n` (rounding took none of 5 tumour patches among 205 for n = 20)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = max(1, int(round(n * len(idx) / len(labels))))
        out.append(rng.permutation(idx)[:take])
    return np.sort(np.concatenate(out))


def split_select_holdout(ds: PatchDataset, seed: int = 0) -> tuple[PatchDataset, PatchDataset]:
    """Halve a validation set, stratified and seeded: one half selects checkpoints, the other is only reported."""
    select = stratified_subset(ds.labels, len(ds) // 2, seed)
    return ds.subset(select), _held_back(ds, select)


def select_and_holdout(valid: PatchDataset, valid_select: int | None, seed: int):
    """(selection part, held-back part or None) of validation patches: `valid_select` patches, stratified and
    seeded by `seed`, select; the rest are only reported (None: the seeded halves of `split_select_holdout`)."""
    if valid_select is None:
        return split_select_holdout(valid, seed)
    if valid_select >= len(valid):
        if valid_select > len(valid):  # said: the held-back figure the user expects silently vanished
            warnings.warn(f"{valid.source}: valid_select {valid_select} is more than its {len(valid)} validation "
                          "patches: all of them select and none is held back (no held-back figure)", UserWarning,
                          stacklevel=2)
        return valid, None
    idx = stratified_subset(valid.labels, valid_select, seed)
    return valid.subset(idx), _held_back(valid, idx)


def _held_back(valid: PatchDataset, select_idx) -> PatchDataset:
    """The patches outside `select_idx`, less those whose file is byte for byte a selection patch's: PCam repeats
    some images inside a split (39 of the 2,000 held-back patches of the shipped model's valid split have a twin
    among its 1,000 selection patches), and a figure on them would report images that chose the model. The
    selection part is left as drawn, so a model selected before this rule keeps its selection part."""
    from wsi_vssm.training.data.fingerprints import patch_digests

    rest = np.setdiff1d(np.arange(len(valid)), select_idx)
    digests = patch_digests(valid)
    twins = np.isin(digests[rest], digests[np.asarray(select_idx, dtype=np.int64)])
    if twins.any() and _first_time(("held-back twins", valid.source, len(select_idx), int(twins.sum()))):
        warnings.warn(f"{valid.source}: {int(twins.sum()):,} of the {len(rest):,} held-back validation patches are the "
                      "same image as a selection patch: left out of the held-back part "
                      f"({len(rest) - int(twins.sum()):,} remain)", UserWarning, stacklevel=3)
    return valid.subset(rest[~twins])


_SAID: set[tuple] = set()  # warnings about a data set already given in this process (a recipe splits it per stage)


def _first_time(key: tuple) -> bool:
    new = key not in _SAID
    _SAID.add(key)
    return new


def collate_uint8(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[(HxWx3 uint8, label)] -> (B, 3, H, W) uint8, (B,) float labels."""
    imgs = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).contiguous()
    return imgs, torch.tensor([b[1] for b in batch], dtype=torch.float32)


IMBALANCE_WARN = 4  # one class more than this many times the other: warned (PCam is balanced)


def mosaic_order(n_patches: int, grid: int, seed: int) -> np.ndarray:
    """The patches (indices) that in-mosaic scoring tiles, in order: a seeded permutation cut to whole grid x grid
    mosaics (the left-over patches are not scored)."""
    n = grid * grid
    return np.random.default_rng(seed).permutation(n_patches)[: n_patches // n * n]


def check_training_sets(train: PatchDataset, select: PatchDataset, holdout: PatchDataset | None,
                        epoch_size: int | None = None, mosaic: tuple[int, int] | None = None) -> None:
    """Refuse, before any epoch, sets a cell model cannot be trained or selected on: a class missing from the
    training patches (the run wrote a model of one class with exit 0) or from the selection part (every epoch's
    AUC was NaN, no epoch was kept, and the run ended "model file not found"), or from the selection patches
    that `mosaic` = (grid, seed) in-mosaic scoring tiles (the same), patches of two sizes, and validation
    patches that are training patches (a `data/{train,valid}/{0,1}` folder given as --data holds both: labels
    are read at any depth). Some shared images (not all), or one image under both labels: a warning."""
    per_set = [(np.bincount(ds.labels, minlength=2), ds, what)
               for ds, what in ((train, "training patches"), (select, "selection part of the validation patches"))]
    for counts, ds, what in per_set:
        missing = [str(c) for c in (0, 1) if counts[c] == 0]
        if missing:
            raise PatchDataError(f"{ds.source}: its {what} have no class {' or '.join(missing)} ({counts[0]} of "
                                 f"class 0, {counts[1]} of class 1): a cell model needs both (folders 0/ and 1/)")
    if mosaic:
        grid, seed = mosaic
        scored = np.bincount(select.labels[mosaic_order(len(select), grid, seed)], minlength=2)
        if min(scored) == 0:
            held = (f"holds {len(select)} patches, fewer than one {grid} x {grid} mosaic" if not scored.sum() else
                    f"tiles {scored.sum()} patches into {grid} x {grid} mosaics, all of class {int(scored.argmax())}")
            raise PatchDataError(f"{select.source}: the selection part of the validation patches {held}: the "
                                 "in-mosaic AUC that selects epochs needs both classes; give more validation "
                                 "patches (--valid-select; valid_select in a recipe) or a smaller --mosaic-grid")
    counts = per_set[0][0]  # the training patches'
    if epoch_size is not None and epoch_size > len(train):  # an epoch is at most every patch once
        warnings.warn(f"{train.source}: epoch_size {epoch_size} is more than its {len(train)} training patches: an "
                      f"epoch draws each of them once ({len(train)} an epoch)", UserWarning, stacklevel=2)
    if max(counts) > IMBALANCE_WARN * min(counts):
        warnings.warn(f"{train.source}: the training patches are imbalanced ({counts[0]} of class 0, {counts[1]} of "
                      f"class 1) and the loss does not weight them: the model leans to class "
                      f"{int(np.argmax(counts))} (the cell threshold is still set on the selection part); "
                      "balanced folders train better", UserWarning, stacklevel=2)
    sizes = {ds.patch_size for ds in (train, select, holdout) if ds is not None} - {None}
    if len(sizes) > 1:
        shown = ", ".join(f"{w} x {h} px" for w, h in sorted(sizes))
        raise PatchDataError(f"{train.source} and {select.source}: training and validation patches differ in size "
                             f"({shown}); give patches of one size")
    from wsi_vssm.training.data.fingerprints import patch_digests, repeated_patches

    for ds in (train, select):  # the same image under both labels: a labelling error training cannot see
        rep = repeated_patches(patch_digests(ds), ds.labels, [it.name for it in ds.items])
        if rep and rep["conflicting_labels"] and _first_time(("both labels", ds.source, rep["conflicting_labels"])):
            warnings.warn(f"{ds.source}: {rep['conflicting_labels']} image(s) are filed under both labels (byte for "
                          f"byte the same file, e.g. {', '.join(rep['example'])}): the model learns both answers "
                          "for them; remove the wrong copies", UserWarning, stacklevel=2)
    valid = np.concatenate([patch_digests(ds) for ds in (select, holdout) if ds is not None])
    n_shared = int(np.isin(valid, patch_digests(train)).sum())
    if valid.size and n_shared == valid.size:
        raise PatchDataError(f"{train.source}: holds every validation patch of {select.source} (the same images): "
                             "give --data a folder without the validation patches")
    if n_shared:
        warnings.warn(f"{n_shared} of the {len(valid)} validation patches are also training patches (the same "
                      f"image in {train.source} and {select.source}): their scores overstate the model",
                      UserWarning, stacklevel=2)

