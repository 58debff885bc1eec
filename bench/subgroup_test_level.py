"""How often `evaluate --subgroup`'s test of group differences rejects alike groups (its level), and how often it
finds a real difference (its power), on simulated cohorts.

    python bench/subgroup_test_level.py [--reps 2000] [--sizes 10 20 40] [--shifts 1.0 2.0] [--seed 0]

Independent groups (a centre column): two centres of n tumour and n normal slides each; tumours are shifted by
`shift` in both (alike: every rejection is false), then in centre B by half of it (a real difference). Groups
sharing the normal slides (Macro / Micro): two groups of n tumour slides against 2n normal slides, tumours
shifted alike, then B by half. Prints the share of cohorts with p < 0.05 (the aim for alike groups: 0.05) and
the share where the test was undefined (two groups at AUC 0 or 1).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated cohorts per row")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40], help="slides a class and group")
    ap.add_argument("--shifts", type=float, nargs="+", default=[1.0, 2.0], help="tumour shift (AUC 0.76, 0.92)")
    ap.add_argument("--permutations", type=int, default=500, help="regroupings of the shared-normals test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from wsi_vssm.outputs.report import roc_auc
    from wsi_vssm.outputs.subgroups import delong_heterogeneity, permutation_test

    t0 = time.perf_counter()
    print(f"{args.reps} cohorts a row (shared normals: {args.reps // 10}, {args.permutations} regroupings each); "
          "share with p < 0.05")
    print("test | slides a class and group | true AUC | alike groups: rejects (undefined) | B half as shifted: rejects")
    rng = np.random.default_rng(args.seed)
    for n in args.sizes:
        for shift in args.shifts:
            y = np.tile(np.r_[np.ones(n), np.zeros(n)], 2).astype(int)
            v = np.array(["A"] * (2 * n) + ["B"] * (2 * n), dtype=object)
            true_auc = roc_auc(np.r_[np.ones(20000), np.zeros(20000)], rng.normal(size=40000) + shift *
                               np.r_[np.ones(20000), np.zeros(20000)])
            rows = []
            for b_shift in (shift, shift / 2):
                ps = [delong_heterogeneity(y, rng.normal(size=4 * n) + y * np.where(v == "A", shift, b_shift), v,
                                           ["A", "B"])["p"] for _ in range(args.reps)]
                rows.append((np.mean([p is not None and p < 0.05 for p in ps]), np.mean([p is None for p in ps])))
            print(f"DeLong chi-square | {n} | {true_auc:.2f} | {rows[0][0]:.3f} ({rows[0][1]:.3f}) | {rows[1][0]:.3f}")
            ys = np.r_[np.ones(2 * n), np.zeros(2 * n)].astype(int)
            vs = np.array(["A"] * n + ["B"] * n + [""] * (2 * n), dtype=object)
            rows = []
            for b_shift in (shift, shift / 2):
                gain = np.r_[np.full(n, shift), np.full(n, b_shift), np.zeros(2 * n)]
                ps = [permutation_test(ys, rng.normal(size=4 * n) + gain, vs, ["A", "B"], n_perm=args.permutations,
                                       seed=int(rng.integers(1 << 31)))["p"] for _ in range(args.reps // 10)]
                rows.append(np.mean(np.array(ps) < 0.05))
            print(f"permutation, shared normals | {n} | {true_auc:.2f} | {rows[0]:.3f} | {rows[1]:.3f}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
