"""bf16 against fp32 for the default model and for cell training, on PCam (issue 14's agreement figures).

    OMP_NUM_THREADS=2 python bench/bf16.py --valid .../pcam/valid.tar [--tta] [--force-bf16]
    OMP_NUM_THREADS=2 python bench/bf16.py --valid .../valid.tar --train .../train.tar --seeds 0 1 2

Inference (always): the default model scores the held-back part of PCam valid (the same split training and
bench/detector.py use; 1,961 patches) as `wsi-vssm evaluate PATCHES --precision fp32|bf16` does (each patch
alone, its centre token, the model's patch calibration), and this prints each precision's AUC, the AUC change
and the largest and 99th-percentile probability differences.

Training (`--train`): `train cells` from scratch on a seeded subset of the training patches, in fp32 and in
bf16 for each of `--seeds` (a pair differs only in precision). Each run's held-back AUC, each pair's difference
and their mean are printed, with the fp32 runs' spread across seeds to read them against.

On a CPU without AMX-BF16 / AVX512-BF16 the precision machinery runs fp32 for a bf16 request; --force-bf16
runs bf16 anyway (emulated: its rounding is bf16's, its speed means nothing; training steps are about 8x
slower than fp32 on an AVX2 machine). Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs_unchanged import forced_bf16  # noqa: E402  (the same switch as that bench's --force-bf16)


def holdout_split(valid: str, valid_select: int, seed: int):
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    _, holdout = split_valid(load_patches(valid), TrainCellsConfig(seed=seed, valid_select=valid_select))
    return holdout


def patch_probabilities_at(model, ds, precision: str, tta: bool, batch_size: int = 128) -> np.ndarray:
    """Each patch alone, as `evaluate PATCHES` scores it (`runs.evaluate_patches.centre_cell_probabilities`)."""
    from torch.utils.data import DataLoader

    from wsi_vssm.models.inputs import normalise_batch as normalise
    from wsi_vssm.pipeline.extract import Inference
    from wsi_vssm.runs.evaluate_patches import centre_cell_probabilities
    from wsi_vssm.training.data.patches import collate_uint8

    model.eval()
    return np.concatenate([
        centre_cell_probabilities(model, normalise(x.float() / 255), Inference(precision, tta))
        for x, _ in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_uint8)])


def inference(a, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.report import roc_auc_or_nan

    holdout = holdout_split(a.valid, a.valid_select, a.seed)
    y = np.asarray(holdout.labels)
    model = load_model(a.model)
    res = {}
    for precision in precisions:
        t0 = time.perf_counter()
        p = patch_probabilities_at(model, holdout, precision, a.tta)
        res[precision] = {"auc": roc_auc_or_nan(y, p), "seconds": time.perf_counter() - t0, "p": p}
    if precisions == ("fp32",):  # no bf16 to compare with: the fp32 figure alone (with --tta, the card's)
        res["fp32"].pop("p")
        print(f"default model, {len(y)} held-back PCam valid patches{' (8-view TTA)' if a.tta else ''}:")
        print(f"  fp32: AUC {res['fp32']['auc']:.4f}  ({res['fp32']['seconds']:.0f} s); bf16 not run (no native bf16)")
        return res
    d = np.abs(res["bf16"].pop("p") - res["fp32"].pop("p"))
    res["auc_change"] = res["bf16"]["auc"] - res["fp32"]["auc"]
    res["max_prob_diff"], res["p99_prob_diff"] = float(d.max()), float(np.percentile(d, 99))
    print(f"default model, {len(y)} held-back PCam valid patches{' (8-view TTA)' if a.tta else ''}:")
    for precision in ("fp32", "bf16"):
        print(f"  {precision}: AUC {res[precision]['auc']:.4f}  ({res[precision]['seconds']:.0f} s)")
    print(f"  AUC change bf16 - fp32 {res['auc_change']:+.4f} (target |change| <= 0.002); probability "
          f"difference max {res['max_prob_diff']:.4f}, 99th percentile {res['p99_prob_diff']:.4f}")
    return res


def training(a) -> dict:
    """`train cells` in fp32 and in bf16 for each seed. A seed fixes the weights' start, the patch order and the
    selection / held-back split, so each pair differs only in precision; the fp32 runs across seeds give the
    spread (initialisation and split together) that a precision difference is read against."""
    from wsi_vssm.training.cells import TrainCellsConfig, train_cells

    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for precision in ("fp32", "bf16"):
                cfg = TrainCellsConfig(epochs=a.epochs, max_train=a.max_train, seed=seed,
                                       valid_select=a.valid_select, precision=precision, mil_bags=0, lr=a.lr)
                t0 = time.perf_counter()
                r = train_cells(a.train, a.valid, Path(tmp) / f"{precision}-{seed}.pt", cfg, progress=False)
                row = {"precision": precision, "seed": seed, "holdout_auc": r.holdout["auc"],
                       "select_auc": r.select["auc"], "seconds": time.perf_counter() - t0}
                res.append(row)
                print(f"  train cells {precision} seed {seed}: held-back AUC {row['holdout_auc']:.4f} (selection "
                      f"{row['select_auc']:.4f}), {row['seconds']:.0f} s", flush=True)
    auc = {(r["precision"], r["seed"]): r["holdout_auc"] for r in res}
    diffs = [auc["bf16", s] - auc["fp32", s] for s in a.seeds]
    fp32 = [auc["fp32", s] for s in a.seeds]
    print(f"  bf16 - fp32 per seed: {', '.join(f'{d:+.4f}' for d in diffs)}; mean {np.mean(diffs):+.4f} (target "
          f"within 0.005); fp32 across seeds {min(fp32):.4f}-{max(fp32):.4f}")
    secs = {p: np.median([r["seconds"] for r in res if r["precision"] == p]) for p in ("fp32", "bf16")}
    print(f"  median seconds a run: fp32 {secs['fp32']:.0f}, bf16 {secs['bf16']:.0f} "
          f"({secs['fp32'] / secs['bf16']:.2f}x)")
    return {"runs": res, "max_train": a.max_train, "epochs": a.epochs, "lr": a.lr, "bf16_minus_fp32": diffs,
            "mean_bf16_minus_fp32": float(np.mean(diffs))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bf16.py", description=__doc__.split("\n")[0])
    ap.add_argument("--valid", required=True, help="PCam valid split (folder or tar)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--tta", action="store_true", help="score each patch as the mean of its 8 views")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even without native bf16 (emulated)")
    ap.add_argument("--train", default=None, help="PCam train split: also compare training in fp32 and bf16")
    ap.add_argument("--max-train", type=int, default=4000, help="--train: training patches (seeded subset)")
    ap.add_argument("--epochs", type=int, default=3, help="--train: epochs per run")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="--train: peak learning rate (train cells' 2e-3 collapses some seeds on runs this short)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--train: one fp32/bf16 pair each")
    ap.add_argument("--valid-select", type=int, default=1000, help="as in training: patches that select")
    ap.add_argument("--seed", type=int, default=0, help="the selection / held-back split of the inference check")
    ap.add_argument("--out", default="bench/results/bf16.json")
    a = ap.parse_args(argv)
    import torch

    from wsi_vssm.models.precision import bf16_supported, cpu_bf16_flags

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    native = bf16_supported("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16: "
          f"{', '.join(cpu_bf16_flags()) or 'none'}{' (bf16 forced: emulated)' if a.force_bf16 and not native else ''}")
    if not native and not a.force_bf16:
        print("this CPU has no native bf16, so a bf16 request runs fp32: nothing to compare (--force-bf16 runs it "
              "emulated); the fp32 figures alone follow")
        _write(a.out, {"native_bf16": False, "inference": inference(a, ("fp32",))})
        return 0
    ctx = forced_bf16() if a.force_bf16 and not native else _nothing()
    with ctx:
        out = {"native_bf16": native, "inference": inference(a)}
        if a.train:
            out["training"] = training(a)
    _write(a.out, out)
    return 0


def _write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
