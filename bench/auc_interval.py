"""How often each of metrics.json's AUC intervals covers the true AUC, on simulated cohorts.

    python bench/auc_interval.py [--reps 1000] [--sizes 5 10 15 20 40] [--auc 0.75 0.9] [--bootstrap 2000]

Scores are binormal (normals N(0, 1), tumours N(d, 1)), so the true AUC is Phi(d / sqrt(2)). Each cohort of n
slides a class is scored by `report.bootstrap_auc_ci` (the percentile interval `evaluate` prints, as
`auc_ci95`) and `report.delong_auc_ci` (`auc_ci95_delong`). Prints, for each size and AUC, the share of cohorts
whose interval holds the true AUC (95% is the aim), the share where an interval was undefined (DeLong at an
AUC of 1), and the median widths. A cohort whose interval is undefined counts as not covered.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.stats import norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated cohorts per size and AUC")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 15, 20, 40], help="slides a class")
    ap.add_argument("--auc", type=float, nargs="+", default=[0.75, 0.9], help="true AUCs")
    ap.add_argument("--bootstrap", type=int, default=2000, help="resamples, as evaluate --bootstrap")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from wsi_vssm.outputs.report import bootstrap_auc_ci, delong_auc_ci

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    print(f"{args.reps} cohorts each; binormal scores; coverage of the true AUC (aim 0.95)")
    print("slides a class | true AUC | bootstrap cover | width | DeLong cover | width | DeLong undefined")
    for auc in args.auc:
        d = math.sqrt(2.0) * norm.ppf(auc)
        for n in args.sizes:
            hits = {"bootstrap": 0, "delong": 0}
            widths = {"bootstrap": [], "delong": []}
            undefined = 0
            y = np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)]
            for rep in range(args.reps):
                s = np.r_[rng.normal(d, 1.0, n), rng.normal(0.0, 1.0, n)]
                intervals = {"bootstrap": bootstrap_auc_ci(y, s, n_boot=args.bootstrap, seed=rep),
                             "delong": delong_auc_ci(y, s)}
                if intervals["delong"] is None:
                    undefined += 1
                for name, ci in intervals.items():
                    if ci is not None:
                        hits[name] += ci[0] <= auc <= ci[1]
                        widths[name].append(ci[1] - ci[0])
            print(f"{n:>14} | {auc:>8.3f} | {hits['bootstrap'] / args.reps:>15.3f} | "
                  f"{np.median(widths['bootstrap']):.3f} | {hits['delong'] / args.reps:>12.3f} | "
                  f"{np.median(widths['delong']) if widths['delong'] else math.nan:.3f} | "
                  f"{undefined / args.reps:.3f}", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
