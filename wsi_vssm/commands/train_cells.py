"""`wsi-vssm train cells`: stage 1, the backbone and the cell head on cell labels (patches, annotated slides).

Several GPUs: `torchrun --nproc_per_node N -m wsi_vssm train cells ... --device cuda` (DDP; the effective batch is
N x --batch-size; only rank 0 prints and writes files).
"""

from __future__ import annotations

from pathlib import Path

import click

from wsi_vssm.commands.options import MPP_RANGE, FiniteFloatRange, NonEmptyPath, one_spelling, precision_option


@click.command("cells", short_help="Train a backbone and its cell head on labelled patches.")
@click.option("--data", "train_src", required=True, type=click.Path(exists=True, path_type=Path),
              help="Training patches: a folder or .tar in ImageFolder layout (0/*.jpg, 1/*.jpg), e.g. PCam train.tar.")
@click.option("--valid", "valid_src", required=True, type=click.Path(exists=True, path_type=Path),
              help="Validation patches (same layout). One part selects the checkpoint, the rest is only reported.")
@click.option("--out", "-o", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Model file to write (the best checkpoint by validation AUC).")
@click.option("--arch", "--model", "arch", default=["micro"], show_default=True, multiple=True, callback=one_spelling,
              help="Backbone architecture from the registry (micro, micro_wide, tiny, small, base, ...); --model, its "
                   "older name, still works (elsewhere --model is a model file).")
@click.option("--mpp", type=MPP_RANGE, default=0.97, show_default=True,
              help="The patches' resolution in um/px (PCam: 0.97); `predict` reads slides at it with this model.")
@click.option("--domain", default=None, metavar="TEXT",
              help="What the patches show, said with every prediction (default: 'patches of DATA at about MPP "
                   "um/px').")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Most epochs; --patience may stop earlier.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Patches per step (per process under torchrun).")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (AdamW).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the weights, the data order and the validation split.")
@click.option("--max-train", type=click.IntRange(min=2), default=None,
              help="Train on a seeded class-stratified subset of this many patches.")
@click.option("--epoch-size", type=click.IntRange(min=1), default=None,
              help="Patches per epoch, a fresh seeded draw each epoch (default: all).")
@click.option("--valid-select", type=click.IntRange(min=2), default=None,
              help="Validation patches used for selection (stratified); the rest are held back [default: half].")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="Stop after this many epochs without a better validation AUC.")
@click.option("--min-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="No early stop before this epoch (the peak learning rate can hold the AUC down for a while).")
@click.option("--ema", type=FiniteFloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Decay of a moving average of the weights that is validated and saved (0: off; e.g. 0.999).")
@click.option("--drop-path", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help="Stochastic-depth rate while training (default: the architecture's own; micro has 0).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Start from this model file's weights (fine-tuning) instead of a fresh --arch.")
@click.option("--mosaic-grid", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also train on G x G mosaics of the training patches (labels on their centre tokens) and select "
                   "on the mean of the isolated and in-mosaic AUC (0: off).")
@click.option("--region-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Region crops (annotated slides or mosaics) per step.")
@click.option("--slides", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of slides with lesion annotations (XML, GeoJSON, DSA JSON, .ndpa; docs/io.md): an extra "
                   "source of region crops.")
@click.option("--scan", default="auto", show_default=True,
              help="Selective-scan implementation: auto, reference, cpu, chunked, mamba_ssm or triton (another "
                   "name is refused before any data is read).")
@click.option("--no-augment", is_flag=True, help="Turn off stain/colour jitter, blur and flips.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
              help="Training device (auto: CUDA when torch sees a GPU, else cpu, as every other command); under "
                   "torchrun each process takes GPU LOCAL_RANK.")
@precision_option
@click.option("--log", "log_path", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Per-epoch log, CSV (or JSON by extension); default: OUT with .log.csv.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last finished epoch (OUT with .checkpoint.pt, written "
                   "every epoch); the same options, but --epochs, --patience, --min-epochs, --device and --domain may "
                   "change.")
def command(train_src, valid_src, out, arch, mpp, domain, epochs, batch_size, lr, seed, max_train, epoch_size,
            valid_select, patience, min_epochs, ema, drop_path, init, mosaic_grid, region_batch, slides, scan,
            no_augment, device, precision, log_path, resume):
    """Train a backbone and its cell head on labelled patches (label = the centre 32 px, the centre token)."""
    from wsi_vssm.commands.options import option_backbone, option_device, option_output
    from wsi_vssm.errors import OptionError
    from wsi_vssm.training.cells import TrainCellsConfig, train_cells
    from wsi_vssm.training.checkpoint import refuse_resuming_a_finished_model
    from wsi_vssm.training.data.augment import AugmentConfig
    from wsi_vssm.training.ddp import is_main

    # option values the library would reject only after loading the data: usage errors (exit 2) at once
    if mosaic_grid == 1:
        raise OptionError("--mosaic-grid must be 0 (off) or at least 2, got 1")
    if slides is not None and mosaic_grid:
        raise OptionError("--slides and --mosaic-grid are two sources of region crops; give one")
    option_backbone(arch, scan)
    option_device(device)
    option_output("--out", out)
    option_output("--log", log_path)
    aug = AugmentConfig(flip_rot=False, hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0,
                        blur_p=0) if no_augment else AugmentConfig()
    cfg = TrainCellsConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_train=max_train,
                           epoch_size=epoch_size, valid_select=valid_select, patience=patience,
                           min_epochs=min_epochs, scan=scan,
                           device=device, augment=aug, ema=ema, drop_path=drop_path, init=init,
                           mosaic_grid=mosaic_grid, region_batch=region_batch, precision=precision, resume=resume,
                           mpp=mpp, domain=domain or f"patches of {train_src.name} at about {mpp:g} um/px")
    # `train cells --resume` alone (a recipe's stage starts from the last stage's finished model with resume on)
    refuse_resuming_a_finished_model(out, out.with_suffix(".checkpoint.pt"), resume)  # train_cells' default
    r = train_cells(train_src, valid_src, out, cfg, slides=slides, progress=True, log_path=log_path)
    if not is_main():  # under torchrun: rank 0 reports
        return
    sel = r.select
    click.echo(f"best epoch {r.best_epoch} of {len(r.log)}: valid(select, n={sel['n']}) AUC {sel['auc']:.4f} "
               f"accuracy {sel['accuracy']:.4f}")
    if r.holdout:
        h = r.holdout
        click.echo(f"held-back valid (n={h['n']}, never used to select): AUC {h['auc']:.4f} "
                   f"accuracy {h['accuracy']:.4f}")
    click.echo(f"wrote {out} in {r.seconds:.0f} s")
