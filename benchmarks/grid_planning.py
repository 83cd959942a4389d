"""Time planning + cache look-up of a large grid (no training): `python benchmarks/grid_planning.py --seeds 10`.

The grid: digits x fastnet x SEEDS seeds x RATES random-flip rates x DEFENCES finetune variants,
i.e. SEEDS * (1 + RATES * (1 + DEFENCES)) runs (1,000 with the defaults). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from poisonlab.experiments import parse_config
from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rates", type=int, default=9)
    ap.add_argument("--defences", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cfg = parse_config({"seeds": list(range(a.seeds)), "dataset": {"name": "digits"},
                        "attacks": [{"name": "random_flip", "rate": [round(0.02 * i, 2) for i in range(1, a.rates + 1)]}],
                        "defenses": [{"name": "finetune", "epochs": list(range(1, a.defences + 1))}]})
    out = Path(tempfile.mkdtemp())
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        plan = build_plan(cfg, out, ArtifactCache(out / "cache"), estimate=False)
        plan.describe()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    build_plan(cfg, out, ArtifactCache(out / "cache"), estimate=True)
    est = time.perf_counter() - t0
    print(json.dumps({"runs": len(plan.runs), "plan_and_lookup_seconds": [round(t, 3) for t in times],
                      "with_time_estimate_seconds": round(est, 3)}, indent=2))


if __name__ == "__main__":
    main()
