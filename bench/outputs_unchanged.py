"""Issue 14's target "default model's outputs on the sample slide: unchanged within 1e-4 (fp32)".

    OMP_NUM_THREADS=2 python bench/outputs_unchanged.py [SLIDE ...] [--bf16 | --force-bf16] [--tol 1e-4]

For the packaged default model and each sample slide (default: sample_data/cmu-1-small-region.svs and
sample_data/lymph-node-mosaic.tif) this runs the real prediction path, `pipeline.predict.predict_slide` (what
`wsi-vssm predict` calls), into a temporary folder twice, in fp32 without test-time augmentation:

- old: today's path before the speed work: selective scan 'cpu' (the numba scan kernel) and SS2D 'reference'
  (channel-first, cross_scan / grouped scan / cross_merge, streaming on large maps);
- new: what `predict` uses by default now: the fused channels-last CPU SS2D (`ss2d_impl="auto"`).

It prints per slide the number of cells, the maximum absolute difference (new against old) of the cell
probabilities (heatmap.ome.zarr level 0), the cell logits and the slide probability (both taken from the MIL
head's output during the run), whether the outputs (cell and slide probabilities) agree within --tol, and each
path's wall time (predict_slide total and its feature-extraction part). To show where a difference comes from
it also prints, unchecked, the difference of the cell features as stored (float16, as `predict` keeps them
before the MIL head), of every region's fp32 last-stage map, and of the cell head's logits on those fp32 maps.
Both paths are warmed up first on a 1,024 px input so numba's first compile (60-140 s when its cache is cold)
is not timed.
Exit status 1 when a cell probability or the slide probability differs by more than --tol. Cell logits are
printed but not checked: they are not an output, and a feature difference under 1e-5 that crosses a float16
rounding step of the stored features moves a logit by up to ~4e-4 (5e-5 in probability).

bf16: --bf16 also runs the new path with `precision="bf16"` and prints the maximum cell-probability difference
against its fp32 run; on a CPU without AMX-BF16/AVX512-BF16 the precision machinery runs fp32 instead, so this
is reported as not measured. --force-bf16 (as in bench/backbone.py) runs bf16 even there (emulated: slow, and
only its agreement means anything). The bf16 differences are reported, not checked against --tol.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = (REPO / "sample_data" / "cmu-1-small-region.svs", REPO / "sample_data" / "lymph-node-mosaic.tif")


def load(path: str) -> object:
    """The default model on the old path ("old") or as loaded, the default new path ("new")."""
    from wsi_vssm.models import SS2D
    from wsi_vssm.models.slide_model import load_model

    if path == "new":
        return load_model("default")
    model = load_model("default", scan="cpu")
    model.backbone.config.ss2d_impl = "reference"
    for m in model.backbone.modules():
        if isinstance(m, SS2D):
            m.impl = "reference"
    return model


def warm_up(model) -> float:
    """One untimed forward on a 1,024 px input (its stage-1 map streams, later stages do not): compiles or loads
    every numba kernel the slides need. Returns its seconds."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model.backbone.forward_features(torch.zeros(1, 3, 1024, 1024))
    return time.perf_counter() - t0


@contextlib.contextmanager
def forced_bf16():
    """bf16 even without native support: the precision machinery's hardware check answers yes."""
    from wsi_vssm.models import precision

    saved = precision.bf16_supported
    precision.bf16_supported = lambda device="cpu": True
    try:
        yield
    finally:
        precision.bf16_supported = saved


def predict(model, slide: Path, out_root: Path, precision: str = "fp32") -> dict:
    """predict_slide as `wsi-vssm predict` runs it (fp32 default, no TTA, the CLI's other defaults). Returns
    the record plus the heatmap's level 0 and the MIL head's inputs and outputs seen during the run."""
    from wsi_vssm.outputs import files
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.pipeline.predict import PredictParams, predict_slide

    seen = {}

    def hook(_module, args, out):
        seen["features"] = args[0].float().numpy().copy()
        seen["cell_logits"] = out.cell_logits[0].detach().numpy().copy()
        seen["slide_logit"] = float(out.slide_logit[0])

    maps = seen["maps"] = []  # each region's last-stage map in fp32, before the cells are stored as float16
    handles = [model.mil.register_forward_hook(hook), model.backbone.layers[-1].blocks.register_forward_hook(
        lambda _m, _a, out: maps.append(out.detach().float().permute(0, 2, 3, 1).contiguous()))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CMU slide's warnings (a call on 0 cells); not what is measured here
            t0 = time.perf_counter()
            record = predict_slide(slide, model, out_root, PredictParams(precision=precision, tta=False))
            wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    heat, *_ = read_heatmap_zarr(out_root / record["slide"] / files.HEATMAP_ZARR, level=0)
    return {"record": record, "heat": heat, "wall": wall, **seen}


def fp32_maps(model, old: list, new: list) -> dict:
    """Differences before float16 storage: the last-stage maps of every region (all tokens, overlaps too) and
    the cell head's logits on them."""
    import torch

    assert [m.shape for m in old] == [m.shape for m in new], "the two paths saw different regions"
    pairs = list(zip(old, new, strict=True))
    with torch.inference_mode():
        head = model.mil.cell_head
        logits = max((max_diff(head(a), head(b)) for a, b in pairs), default=0.0)
    return {"region feature map (fp32, before storage)": max((max_diff(a, b) for a, b in pairs), default=0.0),
            "cell logit on the fp32 maps": logits}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", nargs="*", type=Path, default=list(SAMPLES))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--bf16", action="store_true", help="also new path bf16 vs fp32, where the CPU has it")
    ap.add_argument("--force-bf16", action="store_true", help="--bf16 even without native bf16 (emulated)")
    args = ap.parse_args(argv)

    import torch

    from wsi_vssm.models.precision import cpu_bf16_flags

    flags = cpu_bf16_flags()
    bf16 = args.force_bf16 or (args.bf16 and bool(flags))
    models = {name: load(name) for name in ("old", "new")}
    probe = torch.zeros(1, 3, 64, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; native bf16: {', '.join(flags) or 'none'}")
    for name, model in models.items():
        print(f"{name}: fused SS2D {model.backbone.channels_last(probe)}; warm-up (1,024 px, numba compile or "
              f"cache load) {warm_up(model):.1f} s")

    ok = True
    with tempfile.TemporaryDirectory(prefix="wsi-vssm-unchanged-") as tmp:
        for slide in args.slides:
            runs = {name: predict(model, slide, Path(tmp) / name) for name, model in models.items()}
            old, new = runs["old"], runs["new"]
            n_old, n_new = old["record"]["summary"]["n_cells"], new["record"]["summary"]["n_cells"]
            p_old, p_new = old["record"]["probability"], new["record"]["probability"]
            d = {"cell probability (heatmap level 0)": max_diff(old["heat"], new["heat"]),
                 "slide probability": abs(p_old - p_new)}
            within = n_old == n_new and all(v <= args.tol for v in d.values())
            ok &= within
            print(f"\n{slide.name}: {n_new} cells (old path {n_old}); slide probability old {p_old:.6f} new "
                  f"{p_new:.6f}")
            for what, v in d.items():
                print(f"  max |new - old| {what:<44} {v:.3g}{'  > tol' if v > args.tol else ''}")
            info = {"cell logit (not an output)": max_diff(old["cell_logits"], new["cell_logits"]),
                    "cell feature (as stored, float16)": max_diff(old["features"], new["features"]),
                    **fp32_maps(models["new"], old["maps"], new["maps"])}
            for what, v in info.items():  # where a difference comes from; not checked
                print(f"  max |new - old| {what:<44} {v:.3g}")
            print(f"  all within {args.tol:g}: {'yes' if within else 'NO'}")
            for name, run in runs.items():
                t = run["record"]["timings"]
                print(f"  wall time {name}: {run['wall']:.2f} s (features {t['features']:.2f} s)")
            if bf16:
                with forced_bf16() if args.force_bf16 and not flags else contextlib.nullcontext():
                    run = predict(models["new"], slide, Path(tmp) / "bf16", precision="bf16")
                print(f"  bf16 vs fp32 (new path{', emulated' if not flags else ''}): max cell-probability "
                      f"difference {max_diff(new['heat'], run['heat']):.3g}, slide probability "
                      f"{abs(run['record']['probability'] - p_new):.3g}; wall time {run['wall']:.2f} s")
    if not bf16:
        print("\nbf16: not measured (" + ("this CPU has no AMX-BF16/AVX512-BF16, so bf16 would run fp32; "
              "--force-bf16 measures it emulated)" if args.bf16 or not flags else "pass --bf16)"))
    print(f"\nresult: {'outputs unchanged' if ok else 'OUTPUTS CHANGED'} within {args.tol:g} (fp32, old vs new path)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
