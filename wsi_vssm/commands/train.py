"""`wsi-vssm train ...`: training stages. `mil` trains the slide head on cached features (stage 3).

`command` is a click group; further stages (e.g. `cells`) register on it with `command.add_command(...)`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from pathlib import Path

import click

from wsi_vssm.commands.options import FiniteFloatRange, NonEmptyPath
from wsi_vssm.errors import WsiVssmError

command = click.Group(
    "train", short_help="Train the cell stage (cells) or the slide head (mil).",
    help="Train models: `cells` trains a backbone and its cell head on labelled patches; `mil` fits the "
         "slide-level attention head on cached features.")


@command.command("mil", short_help="Train the slide (MIL) head on extract's feature stores.")
@click.option("--features", "features_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of feature stores (<slide>.zarr) from `wsi-vssm extract`.")
@click.option("--labels", required=True, type=click.Path(exists=True, path_type=Path),
              help="reference.csv (CAMELYON16 style) or a manifest CSV slide,label[,split].")
@click.option("--out", "-o", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Checkpoint to write (e.g. model_mil.pt).")
@click.option("--valid-labels", type=click.Path(exists=True, path_type=Path), default=None,
              help="A separate table of validation slides; --labels then gives the training slides. Either "
                   "table's split column is obeyed: rows of --labels marked valid or test, and rows of this table "
                   "marked train or test, are left out (the summary line counts them). A slide in both tables is "
                   "refused.")
@click.option("--valid-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of slides held out for validation by a seeded stratified split (default 0.25 when "
                   "--labels has no split column).")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True,
              help="Stop after this many epochs without a better validation AUC.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=2e-4, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--ensemble", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Train this many heads with seeds SEED, SEED+1, ... on the same split and write their mean as "
                   "OUT (one slide head: the mean of their slide logits); each member is kept beside it as "
                   "OUT-seedS.pt. One head's AUC moves with its seed; their mean does not rest on one draw.")
@click.option("--max-cells", type=click.IntRange(min=1), default=None,
              help="Random cells per training bag per step (default: all).")
@click.option("--model", "model_file", default=None,
              help="The slide-model file (or 'default', the packaged one) whose backbone made the features: its "
                   "trained cell head is kept, and every store is checked to be its backbone's. Without it the "
                   "cell head starts random (and stays so unless --train-cell-head) and the backbone is not "
                   "checked.")
@click.option("--train-cell-head/--freeze-cell-head", default=False, show_default=True,
              help="Also train the per-cell head (MIL max-instance loss).")
@click.option("--log", "log_path", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Per-epoch log, CSV (or JSON by extension); default: OUT with .log.csv. With --ensemble, one "
                   "per member (LOG-seedS).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
              help="Where the head trains; auto: CUDA when there is a GPU.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="The MIL head's arithmetic (this stage runs no backbone; the head is small and bf16 rarely pays "
                   "here). bf16 without native hardware support runs fp32 with one warning; auto: bf16 where "
                   "native.")
def mil(features_dir, labels, out, valid_labels, valid_fraction, epochs, patience, lr, seed, ensemble, max_cells,
        model_file, train_cell_head, log_path, device, precision):
    """Train the AttentionMIL slide head on cached features with slide labels."""
    from wsi_vssm.commands.options import option_device, option_output
    from wsi_vssm.errors import OptionError
    from wsi_vssm.training.mil import MILTrainConfig, cell_head_from_model

    if valid_labels is not None and valid_fraction is not None:
        raise OptionError("give --valid-labels or --valid-fraction, not both")
    if ensemble > 1 and (train_cell_head or model_file is None):
        raise OptionError("--ensemble shares one cell head among its members: give --model (the model whose cell "
                          "head they share) and keep --freeze-cell-head")
    dev = option_device(device)
    option_output("--out", out)
    option_output("--log", log_path)
    if out.is_file():  # a finished head there was replaced without a word from the first epoch on
        click.echo(f"wsi-vssm: warning: --out {out} exists: this run replaces it when its first epoch ends (and with "
                   "every better one); copy it away or give another --out to keep it", err=True)
    train, valid, how = _splits(features_dir, labels, valid_labels, valid_fraction, seed)
    click.echo(f"{len(train)} training and {len(valid)} validation slides ({how})")
    cfg = MILTrainConfig(epochs=epochs, patience=patience, lr=lr, seed=seed, max_cells=max_cells,
                         train_cell_head=train_cell_head, device=dev, precision=precision)
    head = None
    if model_file is not None:
        from wsi_vssm.commands.options import model_file as resolve_model

        model_file = Path(resolve_model(model_file))
        if not model_file.is_file():
            raise OptionError(f"--model {model_file}: " + ("is a folder, not a model file" if model_file.is_dir()
                                                          else "no such model file"))
        head, backbone_hash = cell_head_from_model(model_file)
        _check_backbone(backbone_hash, train + valid, model_file)
    log_path = log_path or out.with_name(out.stem + ".log.csv")
    if ensemble == 1:
        _, history = _train_one(train, valid, cfg, head, log_path, out, set())
        click.echo(f"best epoch {history.best_epoch} of {len(history.rows)}: valid AUC "
                   f"{_auc(history.best_valid_auc)}, valid loss {history.best_valid_loss:.4f} -> {out} "
                   f"(log {log_path})")
        return
    from dataclasses import replace

    from wsi_vssm.training.ensemble import save_ensemble
    from wsi_vssm.training.mil import Bags

    heads, histories, shown = [], [], set()
    train, valid = Bags(train, cfg.cache_mb), Bags(valid, cfg.cache_mb)  # read once for every member
    for s in range(seed, seed + ensemble):
        member = _member_path(out, s)
        member_log = _member_path(log_path, s)
        model, history = _train_one(train, valid, replace(cfg, seed=s), head, member_log, member, shown)
        heads.append(model)
        histories.append(history)
        click.echo(f"seed {s}: best epoch {history.best_epoch} of {len(history.rows)}: valid AUC "
                   f"{_auc(history.best_valid_auc)} -> {member} (log {member_log})")
    e = save_ensemble(heads, histories, valid, out)
    click.echo(f"mean of {ensemble} heads (seeds {seed}-{seed + ensemble - 1}): valid AUC {_auc(e['valid_auc'])}, "
               f"valid loss {e['valid_loss']:.4f} -> {out} (logs per seed: {_member_path(log_path, seed).name} ...)")


def _member_path(path: Path, seed: int) -> Path:
    """An ensemble member's file beside `path`: `mil.pt` -> `mil-seed3.pt`, `mil.log.csv` -> `mil-seed3.log.csv`,
    `run.v2.pt` -> `run.v2-seed3.pt`."""
    name = path.name
    tail = ".log" + path.suffix if name.endswith(".log" + path.suffix) and name != ".log" + path.suffix \
        else path.suffix
    return path.with_name(f"{name[:len(name) - len(tail)]}-seed{seed}{tail}")


def _train_one(train, valid, cfg, head, log_path: Path, out: Path, shown: set):
    """One `train_mil` run with the epoch bar, warnings as one line each, each once per command (the members
    of an ensemble see the same data and would repeat them); (model, history)."""
    from wsi_vssm.training.mil import train_mil

    def show(message, *args, **kwargs) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            _show_warning(message)

    with _EpochBar(cfg.epochs) as bar, warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show  # restored when the block ends
        return train_mil(train, valid, cfg, cell_head=head, log_path=log_path, checkpoint_path=out,
                         progress=bar.update)


def _splits(features_dir: Path, labels: Path, valid_labels: Path | None, valid_fraction: float | None, seed: int):
    """([(store, label)] train, [(store, label)] valid, how the split was made)."""
    from wsi_vssm.runs.cohort import read_cohort
    from wsi_vssm.training.mil import stratified_split

    cohort = read_cohort(labels, find_slides=False)
    vcohort = None if valid_labels is None else read_cohort(valid_labels, find_slides=False)
    labelled = {r.name.lower() for c in (cohort, vcohort) if c is not None for r in c.rows}
    stores, unusable = _stores(features_dir, labelled)
    tables = [labels]
    if vcohort is not None:  # the command has checked that --valid-fraction is not given too
        # each table's split column is obeyed: never train on a row marked valid or test, nor select on test
        train_splits, valid_splits = (None, "train"), (None, "valid")
        train_rows = [r for r in cohort.rows if r.split in train_splits]
        valid_rows = [r for r in vcohort.rows if r.split in valid_splits]
        _check_disjoint(train_rows, labels, valid_rows, valid_labels)
        train_names, valid_names = [r.name for r in train_rows], [r.name for r in valid_rows]
        how = "; ".join([f"validation slides from {valid_labels}", *_left_out(cohort, train_splits),
                         *_left_out(vcohort, valid_splits)])
        all_labels, tables = {**cohort.labels(), **vcohort.labels()}, [labels, valid_labels]
    elif cohort.has_split and valid_fraction is None:
        train_names = [r.name for r in cohort.rows if r.split == "train"]
        valid_names = [r.name for r in cohort.rows if r.split == "valid"]
        how = "; ".join([f"split column of {labels}", *_left_out(cohort, ("train", "valid"))])
        all_labels = cohort.labels()
    else:
        frac = 0.25 if valid_fraction is None else valid_fraction
        rows = [r for r in cohort.rows if r.split != "test"]
        # checked before the split, which only takes slides with a store: a later check would never see them
        _check_stores(features_dir, stores, unusable, [r.name for r in rows], tables)
        usable = [r for r in rows if r.name.lower() in stores]
        train_names, valid_names = stratified_split([r.name for r in usable], [r.label for r in usable], frac, seed)
        how = "; ".join([f"seeded stratified split: {frac:g} of each label held out for validation, seed {seed}",
                         *_left_out(cohort, (None, "train", "valid"))])
        return _bags(train_names, cohort.labels(), stores), _bags(valid_names, cohort.labels(), stores), how
    _check_stores(features_dir, stores, unusable, train_names + valid_names, tables)
    train = _bags(train_names, all_labels, stores)
    valid = _bags(valid_names, all_labels, stores)
    return train, valid, how


def _left_out(cohort, kept: tuple) -> list[str]:
    """The summary line's words for the rows of `cohort` whose split is not in `kept`, if any."""
    counts = Counter(r.split or "blank-split" for r in cohort.rows if r.split not in kept)
    if not counts:
        return []
    what = " and ".join(f"{n} {split}" for split, n in sorted(counts.items()))
    return [f"{what} row(s) of {cohort.source} left out by its split column"]


def _check_disjoint(train_rows: list, labels: Path, valid_rows: list, valid_labels: Path) -> None:
    """A slide to train on that is also a validation slide: one line naming it, before anything is read."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.outputs.files import name_key

    valid = {name_key(r.name): r for r in valid_rows}
    for r in train_rows:
        v = valid.get(name_key(r.name))
        if v is not None:
            raise UsageError(f"slide {r.name!r} is in both --labels {labels} (line {r.line}) and --valid-labels "
                             f"{valid_labels} (line {v.line}): validating on a training slide overstates its AUC; "
                             "list it in one table only")


class FeaturesBusy(WsiVssmError):
    """An extract run is writing stores of the slides `train mil` would read."""

    exit_code = 4  # as a cohort whose slides another run holds: not failed; train when it ends


def _stores(features_dir: Path, labelled: set[str]) -> tuple[dict[str, Path], set[str]]:
    """(slide name (lower case) -> its store, names of the labelled stores left out). Left out, with one
    warning each kind: a store whose slide's latest extract did not finish (its state in the folder says failed
    or running) holds an earlier run's features, maybe of a replaced file; a store without cells (no tissue
    found) is an empty bag, and kept in the split it would count as a slide trained or selected on. A store
    without a state (copied, or from an older version) is kept. Only the stores of `labelled` slides are looked
    into, by their root attributes (the arrays are opened later, by training)."""
    from wsi_vssm.runs.state import STATE_DIR, describe_holder, live_lock, read_state

    live = {}  # an extract at work on a labelled slide: its store is missing, half a run old, or about to change
    for lock in sorted((features_dir / STATE_DIR).glob("*.extract.lock")):
        name = lock.name[: -len(".extract.lock")]
        if name.lower() in labelled and (holder := live_lock(features_dir, "extract", name)):
            live[name] = (holder, lock)
    if live:
        holder, lock = next(iter(live.values()))  # another host's lock cannot be judged from here: said which file
        raise FeaturesBusy(f"--features {features_dir}: {len(live)} labelled slide(s) are being extracted now "
                           f"({_first(list(live))}; {describe_holder(holder)}): wait for that run to finish, then "
                           f"train (a run that was killed on another host leaves {lock}: delete it)")
    stores, stale, empty = {}, {}, []
    for p in sorted(d for d in features_dir.glob("*.zarr") if d.is_dir()):
        name = p.name[: -len(".zarr")]
        if name.lower() not in labelled:
            stores[name.lower()] = p  # not trained on: said no more about (the folder check counts it)
            continue
        state = read_state(features_dir, "extract", name)
        if state is not None and state.get("status") != "done":
            stale[name] = state.get("status")
        elif _n_cells(p) == 0:
            empty.append(name)
        else:
            stores[name.lower()] = p
    if stale:
        click.echo(f"wsi-vssm: warning: {len(stale)} feature store(s) in {features_dir} are left out: the latest "
                   f"extract of their slide did not finish, so they hold an earlier run's features: "
                   f"{_first([f'{n} ({status})' for n, status in stale.items()])}; extract them again", err=True)
    if empty:
        click.echo(f"wsi-vssm: warning: {len(empty)} feature store(s) in {features_dir} hold no cells (no tissue "
                   f"found) and are left out of training and validation: {_first(empty)}", err=True)
    return stores, {n.lower() for n in [*stale, *empty]}


def _n_cells(store: Path) -> int | None:
    """A store's cell count from its root attributes (`n_cells`, which extract writes), else from its arrays;
    None when it cannot be read (training names a damaged store in one line)."""
    from wsi_vssm.outputs.files import zarr_root_attrs
    from wsi_vssm.pipeline.store import FeatureStore, FeatureStoreError

    n = (zarr_root_attrs(store) or {}).get("n_cells")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    try:
        return len(FeatureStore.open(store))
    except FeatureStoreError:
        return None


def _first(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


_WHAT_A_STORE_IS = "feature stores are <slide>.zarr folders, made by `wsi-vssm extract SLIDE... --model M --out DIR`"


def _check_stores(features_dir: Path, stores: dict[str, Path], unusable: set[str], names: list[str],
                  tables: list[Path]) -> None:
    """A --features folder with no usable store, or none for the labelled slides: one line. Labelled slides
    without a store: one warning (how many, the first few), since they are left out of training and validation
    (those `_stores` left out have had theirs)."""
    from wsi_vssm.errors import UsageError

    if not stores and not unusable:
        raise UsageError(f"--features {features_dir}: holds no feature stores ({_WHAT_A_STORE_IS})")
    if names and all(n.lower() in unusable for n in names):
        raise UsageError(f"--features {features_dir}: the store of every labelled slide is left out (as said "
                         "above): nothing to train on")
    names = [n for n in names if n.lower() not in unusable]
    missing = [n for n in names if n.lower() not in stores]
    if missing and len(missing) == len(names):
        found = ", ".join(sorted(stores)[:3]) + (", ..." if len(stores) > 3 else "")
        raise UsageError(f"--features {features_dir}: none of the {len(names)} labelled slide(s) of "
                         f"{' and '.join(map(str, tables))} has a feature store there (it holds {found})")
    if missing:
        click.echo(f"wsi-vssm: warning: {len(missing)} of {len(names)} labelled slide(s) have no feature store "
                   f"in {features_dir} and are left out: {_first(missing)}", err=True)


def _bags(names: list[str], labels: dict[str, int], stores: dict[str, Path]) -> list[tuple[Path, int]]:
    return [(stores[n.lower()], labels[n]) for n in names if n.lower() in stores]  # missing ones: _check_stores


def _check_backbone(backbone_hash: str, bags, model_file: Path) -> None:
    """Each store's backbone, from its root attributes alone (opening every store for it took 9 ms a store); a
    store whose attributes cannot be read is left to the bag loader, which names the damage."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.outputs.files import zarr_root_attrs

    for path, _ in bags:
        attrs = zarr_root_attrs(Path(path))
        if attrs is not None and attrs.get("model_hash") != backbone_hash:
            raise UsageError(f"{path}: features were made by another backbone than the one in {model_file}")


def _auc(value: float) -> str:
    # NaN when validation has one label only (train_mil warns once): say "undefined", not "nan"
    return "undefined" if math.isnan(value) else f"{value:.4f}"


def _show_warning(message, *args, **kwargs) -> None:
    click.echo(f"wsi-vssm: warning: {' '.join(str(message).split())}", err=True)


class _EpochBar:
    """A tqdm bar over epochs on a terminal; one line per epoch otherwise."""

    def __init__(self, epochs: int):
        self.epochs, self.bar = epochs, None

    def __enter__(self):
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.epochs, unit="epoch", desc="train mil")
        return self

    def update(self, row: dict) -> None:
        text = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, valid loss {row['valid_loss']:.4f}, "
                f"valid AUC {_auc(row['valid_auc'])}{' *' if row['best'] else ''}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text.split(": ", 1)[1])
        else:
            click.echo(text)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


from wsi_vssm.commands.train_cells import command as _cells  # noqa: E402  (stage 1; it imports click only)

command.add_command(_cells)
