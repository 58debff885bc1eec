"""`wsi-vssm compare`: two `evaluate` runs of one cohort, slide by slide: the paired test of their AUCs."""

from __future__ import annotations

import click

from wsi_vssm.commands.options import NonEmptyPath


@click.command("compare", short_help="Two evaluate runs of one cohort: the paired test of their AUCs.")
@click.argument("out_a", type=click.Path(exists=True, file_okay=False))
@click.argument("out_b", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_path", type=NonEmptyPath(dir_okay=False, writable=True), default=None,
              help="Also write the comparison (both AUCs, the difference, its intervals, z, p, the slides) here.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Paired bootstrap resamples for the difference's second interval.")
def command(out_a, out_b, json_path, n_boot):
    """Compare the AUCs of two `wsi-vssm evaluate` output folders (e.g. two models, or --tta against none) over
    the slides both scored, joined by name: the paired DeLong test (two-sided p, 95% CI of A - B) and a paired
    stratified bootstrap interval. Slides scored by one run only are left out and named."""
    import warnings

    from wsi_vssm.atomic import atomic_write_json
    from wsi_vssm.outputs.compare import compare_runs

    result = compare_runs(out_a, out_b, n_boot=n_boot)
    items = result["item_kind"]
    for run in result["runs"]:
        if not run["metrics_read"]:
            warnings.warn(f"{run['out']}: no readable metrics.json: its model and settings are unknown (compared "
                          "on its predictions.csv alone)", stacklevel=2)
        if run["left_out"]:
            warnings.warn(f"{run['out']}: {len(run['left_out'])} scored {items} not scored by the other run, "
                          f"left out ({_few(run['left_out'])})", stacklevel=2)
        if run["complete"] is False:
            warnings.warn(f"{run['out']}: its run is not complete; compared on the slides it finished",
                          stacklevel=2)
    a, b = result["runs"]
    if a["cohort"] and b["cohort"] and a["cohort"] != b["cohort"]:
        warnings.warn(f"the runs name different cohorts ({a['cohort']}, {b['cohort']}); compared on the "
                      "slides of one name in both", stacklevel=2)
    if result["differences"]:
        click.echo("the runs differ in: " + "; ".join(f"{k} {a_v} -> {b_v}" for k, (a_v, b_v) in
                                                     result["differences"].items()))
    click.echo(f"compared on {result['n']} {items} scored by both ({result['n_tumour']} tumour, "
               f"{result['n_normal']} normal)")
    for tag, run, auc in (("A", a, result["auc_a"]), ("B", b, result["auc_b"])):
        ident = f"model {run['model']}, weights {str(run['weights_hash'])[:12]}" if run["model"] else "model unknown"
        click.echo(f"{tag}: AUC {auc:.3f} ({ident}; ranked by {run['ranked_by']}) {run['out']}")
    boot = result["ci95_bootstrap"]
    if result["p"] is None:
        click.echo(f"A - B: {result['difference']:+.3f}; DeLong test undefined (no variance to measure: each AUC "
                   f"is 0 or 1, or the two rank the {items} alike); "
                   f"bootstrap 95% CI {boot[0]:+.3f} to {boot[1]:+.3f}")
    else:
        lo, hi = result["ci95"]
        click.echo(f"A - B: {result['difference']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}); paired DeLong z "
                   f"{result['z']:.2f}, p = {_p(result['p'])}; bootstrap 95% CI {boot[0]:+.3f} to {boot[1]:+.3f}")
    if json_path:
        atomic_write_json(json_path, result)
        click.echo(f"-> {json_path}")


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _p(p: float) -> str:
    """A p-value as papers print it: three decimals, or '< 0.001'."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
