"""BackdoorBench's CIFAR-10 table, run and written beside the published figures (docs/BACKDOORBENCH.md).

    python benchmarks/backdoorbench.py --out runs/backdoorbench [--data-dir ../shared/data] [--dry-run]
    python benchmarks/backdoorbench.py --out runs/backdoorbench --table-only     # rewrite the table
    python benchmarks/backdoorbench.py --out runs/backdoorbench --extra-only --extra-seeds 1   # step 2 only

1. runs ``--config`` (default examples/backdoorbench/cifar10.toml: seed 0, every defence) into OUT/table;
2. runs the same attacks on ``--extra-seeds`` (default 1 2) WITHOUT defences into OUT/seeds, with the same
   cache (OUT/cache), so that every poisoned model is trained once per attack and seed;
3. reads both results.csv and writes OUT/table.md (and prints it): the no-defence rows as mean ± std over
   all seeds, the defence rows of seed 0, each beside BackdoorBench's published figure. The defence rows
   of OUT/abl are read too: ABL run alone, hours long, by examples/backdoorbench/abl.toml.

Kill it at any point and run the same command again: finished runs are skipped, trained models come
from the cache. Figures are percentages; DER as BackdoorBench defines it.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The reference figures (CIFAR-10, PreAct-ResNet18, target 0, all-to-one).
# no defence (C-Acc, ASR): 10% from the FT-SAM paper's Table 1 (BackdoorBench settings), 1% from BackdoorBench v1.
PUBLISHED_NO_DEFENCE = {
    ("badnets", 10): (91.82, 93.79), ("blended", 10): (93.44, 97.71), ("sig", 10): (84.49, 97.87),
    ("wanet", 10): (92.80, 98.90),
    ("badnets", 1): (91.32, 95.03), ("blended", 1): (93.47, 99.92), ("sig", 1): (84.48, 98.27),
    ("wanet", 1): (91.25, 89.73),
}
# BadNets 10%, 5% clean data (C-Acc, ASR, DER)
PUBLISHED_DEFENCE = {
    "FT": (90.29, 1.70, 95.28), "FP": (91.77, 0.84, 96.45), "NAD": (88.82, 1.96, 94.42),
    "NC": (57.22, 0.90, 79.14), "ANP": (91.65, 3.83, 94.89), "AC": (48.84, 16.57, 67.12),
    "ABL": (80.10, 0.00, 91.03), "I-BAU": (87.43, 4.48, 92.46), "FT-SAM": (92.21, 1.63, 96.08),
}
DEFENCE_NAMES = {
    "finetune": "FT", "fine_pruning": "FP", "neural_cleanse": "NC", "activation_clustering": "AC",
    "spectral_signatures": "SS", "abl": "ABL", "anp": "ANP", "nad": "NAD", "i_bau": "I-BAU", "ft_sam": "FT-SAM",
    "clp": "CLP",
}
ATTACK_NAMES = {"badnets": "BadNets", "blended": "Blended", "sig": "SIG", "wanet": "WaNet"}
DEFENCE_ORDER = ["FT", "FP", "NC", "AC", "SS", "ABL", "ANP", "NAD", "I-BAU", "FT-SAM", "CLP"]


def bb_rate(label: str, num_classes: int = 10) -> int | None:
    """BackdoorBench's poisoning rate (% of the whole training set) of an attack label such as
    ``badnets(...,rate=0.1,...)``. Our ``sig`` rate is a share of the target class, BackdoorBench's a
    share of the whole set drawn from that class: 1.0 of one class of ten is 10%."""
    m = re.search(r"rate=([0-9.eE-]+)", label)
    if not m:
        return None
    rate = float(m.group(1)) / (num_classes if label.startswith("sig") else 1)
    return round(100 * rate)


def read_rows(path: Path) -> list[dict[str, str]]:
    f = path / "results.csv"
    if not f.is_file():
        return []
    with f.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _num(v: str | None) -> float | None:
    try:
        x = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return None if x is None or math.isnan(x) else x


def _fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "not measured yet"
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f} (n={len(values)})"


def _pub(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def build_table(rows: list[dict[str, str]]) -> str:
    """Markdown tables (no defence, then defences) from results.csv rows of the table and seed runs."""
    attack_rows: dict[tuple[str, int], list[dict[str, str]]] = {}
    defence_rows: dict[tuple[str, int, str], list[dict[str, str]]] = {}
    for r in rows:
        if r.get("error") or r.get("attack") in (None, "", "none"):
            continue
        name = r["attack"].split("(")[0]
        key = (name, bb_rate(r["attack"]) or 0)
        d = r.get("defense") or "none"
        if d == "none":
            attack_rows.setdefault(key, []).append(r)
        else:
            defence_rows.setdefault((*key, DEFENCE_NAMES.get(d.split("(")[0], d)), []).append(r)
    out = ["### No defence (C-Acc / ASR / RA, %; ours: mean ± std over seeds)", "",
           "| attack | rate | C-Acc published | C-Acc ours | ASR published | ASR ours | RA ours |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted(set(PUBLISHED_NO_DEFENCE) | set(attack_rows), key=lambda k: (-k[1], list(ATTACK_NAMES).index(k[0])
                                                                                 if k[0] in ATTACK_NAMES else 99))
    for k in keys:
        got = attack_rows.get(k, [])
        pub = PUBLISHED_NO_DEFENCE.get(k, (None, None))
        col = lambda c: _fmt([v for v in (_num(r.get(c)) for r in got) if v is not None])  # noqa: E731
        out.append(f"| {ATTACK_NAMES.get(k[0], k[0])} | {k[1]}% | {_pub(pub[0])} | {col('clean_acc')} | "
                   f"{_pub(pub[1])} | {col('asr')} | {col('robust_acc')} |")
    out += ["", "### BadNets 10%, defences with 5% clean data (C-Acc / ASR / RA / DER, %; seed 0)", "",
            "| defence | C-Acc published | C-Acc ours | ASR published | ASR ours | RA ours | DER published | DER ours "
            "| defence seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in DEFENCE_ORDER:
        got = defence_rows.get(("badnets", 10, d), [])
        pub = PUBLISHED_DEFENCE.get(d, (None, None, None))
        col = lambda c: _fmt([v for v in (_num(r.get(c)) for r in got) if v is not None])  # noqa: E731
        secs = [v for v in (_num(r.get("defense_seconds")) for r in got) if v is not None]
        out.append(f"| {d} | {_pub(pub[0])} | {col('clean_acc')} | {_pub(pub[1])} | {col('asr')} | "
                   f"{col('robust_acc')} | {_pub(pub[2])} | {col('der')} | "
                   f"{f'{statistics.mean(secs):.0f}' if secs else 'not measured yet'} |")
    others = sorted(k for k in defence_rows if k[:2] != ("badnets", 10))
    if others:
        out += ["", "### Other attacks with defences (ours only; C-Acc / ASR / DER, %)", "",
                "| attack | rate | defence | C-Acc | ASR | RA | DER |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for k in others:
            got = defence_rows[k]
            col = lambda c: _fmt([v for v in (_num(r.get(c)) for r in got) if v is not None])  # noqa: E731
            out.append(f"| {ATTACK_NAMES.get(k[0], k[0])} | {k[1]}% | {k[2]} | {col('clean_acc')} | {col('asr')} | "
                       f"{col('robust_acc')} | {col('der')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples" / "backdoorbench" / "cifar10.toml"))
    ap.add_argument("--out", default="runs/backdoorbench")
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2],
                    help="seeds of the no-defence rows beside the config's own")
    ap.add_argument("--extra-only", action="store_true",
                    help="run only step 2 (the no-defence rows of --extra-seeds); the table still reads OUT/table "
                         "if a run of step 1 left results there")
    ap.add_argument("--dry-run", action="store_true", help="print both plans and stop")
    ap.add_argument("--table-only", action="store_true", help="only (re)write OUT/table.md from the results")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.table_only:
        from poisonlab.errors import PoisonlabError
        from poisonlab.experiments import load_config, run_experiment

        try:
            cfg = load_config(args.config)
            extra = [s for s in args.extra_seeds if s not in cfg.seeds]
            if args.extra_only and not extra:
                ap.error(f"--extra-only: --extra-seeds gives no seed beyond the config's {cfg.seeds}")
            passes = [] if args.extra_only else [(cfg, out / "table")]
            if extra:  # the no-defence rows on more seeds: same attacks, same cache, no defences
                passes.append((cfg.model_copy(update={"name": cfg.name + "-seeds", "seeds": extra, "defenses": []}),
                               out / "seeds"))
            for c, o in passes:
                run_experiment(c, o, args.data_dir, progress=not args.quiet, cache_dir=out / "cache",
                               dry_run=args.dry_run)
        except PoisonlabError as e:
            sys.exit(f"error: {e}")
        if args.dry_run:
            return
    # OUT/abl: the ABL row run alone (examples/backdoorbench/abl.toml); its no-defence row is seed 0's again
    abl = [r for r in read_rows(out / "abl") if (r.get("defense") or "none") != "none"]
    table = build_table(read_rows(out / "table") + read_rows(out / "seeds") + abl)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
