"""How often `wsi-vssm compare`'s paired DeLong test rejects equal AUCs (its level), on simulated cohorts.

    python bench/paired_delong_level.py [--reps 2000] [--sizes 5 10 20 40] [--seeds 0 1 2] [--noise 0.7]

Each cohort has n slides a class and one latent score (tumours shifted by 1.2); runs A and B read it through
independent noise of the same size, so their true AUCs are equal and every rejection is a false one. Prints, per
size and seed, the share of cohorts with p < 0.05 (the aim: 0.05) and the share where the test was undefined
(no variance to measure). Also the paired bootstrap interval's share of cohorts that exclude 0, on fewer reps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated cohorts per size and seed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40], help="slides a class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, default=0.7, help="each run's own noise on the latent score")
    ap.add_argument("--bootstrap-reps", type=int, default=200, help="cohorts for the bootstrap's check")
    args = ap.parse_args()

    from wsi_vssm.outputs.compare import paired_bootstrap_difference, paired_delong

    t0 = time.perf_counter()
    print(f"{args.reps} cohorts each; equal true AUCs; rejections at p < 0.05 (aim 0.05)")
    print("slides a class | seed | DeLong rejects | undefined | bootstrap excludes 0")
    for n in args.sizes:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            y = np.r_[np.ones(n), np.zeros(n)].astype(int)
            rejected = undefined = excluded = 0
            for rep in range(args.reps):
                latent = 1.2 * y + rng.normal(size=2 * n)
                a = latent + args.noise * rng.normal(size=2 * n)
                b = latent + args.noise * rng.normal(size=2 * n)
                p = paired_delong(y, a, b)["p"]
                undefined += p is None
                rejected += p is not None and p < 0.05
                if rep < args.bootstrap_reps:
                    low, high = paired_bootstrap_difference(y, a, b, n_boot=1000, seed=rep)
                    excluded += low > 0 or high < 0
            print(f"{n:14d} | {seed:4d} | {rejected / args.reps:14.4f} | {undefined / args.reps:9.4f} | "
                  f"{excluded / min(args.reps, args.bootstrap_reps):.3f}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
