"""The per-run plots of report.html (issue 15, item 11): per-class accuracy bars, Neural Cleanse's reversed
triggers, STRIP's entropy histograms; which runs have them, that they survive a re-run from the cache, and
that a cache written before the defences' arrays existed (or ``plots = false``) simply leaves them out."""

import html
import io
import json
import re
import zipfile

import numpy as np
import pytest

from poisonlab.defenses import DEFENSES, Defense, DefenseResult
from poisonlab.experiments import parse_config
from poisonlab.experiments.runner import run_experiment
from poisonlab.report.html import PLOT_TITLES

NEW_KINDS = ("per_class", "nc_triggers", "strip_entropy")


class _ReservedArrays(Defense):
    """Test-only defence: leaves the model alone and returns an array under the runner's own name ``kept``."""

    def run(self, ctx):
        return DefenseResult(model=ctx.model, arrays={"kept": np.zeros(3)})


CFG = {"name": "report-plots", "dataset": {"name": "digits", "train_size": 400, "test_size": 120},
       "training": {"epochs": 3, "batch_size": 64}, "clean_fraction": 0.2,
       "attacks": [{"name": "badnets", "size": 1, "rate": 0.1, "intensity": 1.0, "target": 0}],
       "defenses": [{"name": "neural_cleanse", "steps": 20, "epochs": 1}, {"name": "strip", "n": 4},
                    {"name": "t_reserved_arrays"}]}


def _run(out, **kw):
    return run_experiment(parse_config(CFG | kw.pop("cfg", {})), out, progress=False, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    DEFENSES.register("t_reserved_arrays")(_ReservedArrays)
    try:
        root = tmp_path_factory.mktemp("plots")
        _run(root / "first")
        yield root
    finally:
        DEFENSES._items.pop("t_reserved_arrays", None)


def _kind(row):
    """'baseline', 'attack', or the defence's registry name."""
    if row["attack"] == "none":
        return "baseline"
    return "attack" if row["defense"] == "none" else row["defense"].split("(")[0]


def _details(out):
    rows = json.loads((out / "results.json").read_text())
    return {_kind(r): (r, json.loads((out / "runs" / f"{r['run']}.json").read_text())) for r in rows}


def test_each_run_has_the_plots_it_should(grid):
    out = grid / "first"
    runs = _details(out)
    assert set(runs) == {"baseline", "attack", "neural_cleanse", "strip", "t_reserved_arrays"}
    expect = {"baseline": {"per_class"}, "attack": {"per_class"}, "neural_cleanse": {"per_class", "nc_triggers"},
              "strip": {"per_class", "strip_entropy"}, "t_reserved_arrays": set()}
    page = (out / "report.html").read_text()
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"<details><summary>([^<]*)</summary>(.*?)</details>",
                                                          page, re.S)}
    for kind, (row, detail) in runs.items():
        plots = detail.get("plots", {})
        assert {k for k in plots if k in NEW_KINDS} == expect[kind], (kind, plots)
        for k in plots:
            assert (out / plots[k]).read_bytes().startswith(b"\x89PNG")
        block = blocks[row["run"]]
        for k in NEW_KINDS:  # embedded (base64) with its caption in that run's section, and only there
            assert (html.escape(PLOT_TITLES[k]) in block) == (k in expect[kind]), (kind, k)
            if k in expect[kind]:
                assert re.search(rf'alt="[^"]* {k}" src="data:image/png;base64,', block), (kind, k)
    # the attack's and the defences' bars stand beside the baseline's: their run JSON holds both figures
    base = runs["baseline"][1]["metrics"]["per_class_acc"]
    assert len(base) == 10 and all(0 <= a <= 1 for a in base)


def test_defence_arrays_are_cached_with_the_run(grid):
    from poisonlab.experiments.cache import ArtifactCache

    out = grid / "first"
    runs = _details(out)
    cache = ArtifactCache(out / "cache")
    nc = cache.arrays("defense", runs["neural_cleanse"][0]["key"])
    assert nc["nc_mask"].shape == (10, 8, 8) and nc["nc_mask"].dtype == np.uint8
    assert nc["nc_pattern"].shape == (10, 8, 8, 1) and nc["nc_pattern"].dtype == np.uint8
    l1 = runs["neural_cleanse"][1]["defense_metrics"]["mask_l1"]
    # the stored masks are the ones the metrics describe (to uint8 rounding: 64 pixels x 0.5/255 at most)
    assert np.allclose(nc["nc_mask"].sum((1, 2)) / 255, l1, atol=64 * 0.5 / 255 + 1e-6)
    st = cache.arrays("defense", runs["strip"][0]["key"])
    test_labels = _test_labels()
    assert st["strip_ent_clean"].shape == (len(test_labels),)
    assert st["strip_ent_trig"].shape == ((test_labels != 0).sum(),)
    dm = runs["strip"][1]["defense_metrics"]
    assert st["strip_ent_clean"].mean() == pytest.approx(dm["entropy_clean_mean"], rel=1e-5)
    assert st["strip_ent_trig"].mean() == pytest.approx(dm["entropy_triggered_mean"], rel=1e-5)
    assert "nc_mask" not in st and "strip_ent_clean" not in nc


def _test_labels():
    from poisonlab.experiments.stages import dataset_splits

    return dataset_splits(parse_config(CFG).dataset[0]).test.labels


def test_reserved_array_name_is_refused(grid):
    row, detail = _details(grid / "first")["t_reserved_arrays"]
    assert "may not use the name 'kept'" in row["error"] and "t_reserved_arrays" in row["error"]


def test_rerun_from_the_cache_reproduces_the_plots(grid):
    first, second = grid / "first", grid / "second"
    entries = sorted(p.parent for p in (first / "cache").rglob("meta.json"))
    _run(second, cache_dir=first / "cache")
    assert sorted(p.parent for p in (first / "cache").rglob("meta.json")) == entries  # nothing recomputed
    a, b = _details(first), _details(second)
    for kind in ("neural_cleanse", "strip", "attack"):
        pa, pb = a[kind][1]["plots"], b[kind][1]["plots"]
        assert set(pa) == set(pb)
        for k in NEW_KINDS:
            if k in pa:  # drawn again from the cached arrays and metrics: the same picture
                assert (second / pb[k]).read_bytes() == (first / pa[k]).read_bytes(), (kind, k)


def _strip_npz(path, prefixes):
    """Rewrite ``path`` (an arrays.npz) without the arrays whose names start with ``prefixes``."""
    with np.load(path, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not k.startswith(prefixes)}
    buf = io.BytesIO()
    np.savez(buf, **kept)
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path) as z:
        assert not any(n.startswith(prefixes) for n in z.namelist())


def test_cache_from_before_the_arrays_has_no_such_plots(grid, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(grid / "first" / "cache", cache)
    for npz in (cache / "defense").rglob("arrays.npz"):
        _strip_npz(npz, ("nc_", "strip_"))
    out = tmp_path / "old"
    with _no_warning():
        _run(out, cache_dir=cache)
    runs = _details(out)
    assert not runs["neural_cleanse"][0].get("error") and not runs["strip"][0].get("error")
    assert "nc_triggers" not in runs["neural_cleanse"][1]["plots"]
    assert "strip_entropy" not in runs["strip"][1]["plots"]
    assert "per_class" in runs["strip"][1]["plots"]  # the rest is drawn as before
    page = (out / "report.html").read_text()
    assert html.escape(PLOT_TITLES["nc_triggers"]) not in page
    assert html.escape(PLOT_TITLES["strip_entropy"]) not in page
    assert html.escape(PLOT_TITLES["per_class"]) in page


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            yield
        msgs = [str(x.message) for x in w if "plots" in str(x.message) or "cache" in str(x.message)]
        assert not msgs, msgs

    return cm()


def test_plots_false_skips_every_plot(grid, tmp_path):
    out = tmp_path / "noplots"
    _run(out, cache_dir=grid / "first" / "cache", cfg={"plots": False})
    for _, detail in _details(out).values():
        assert not detail.get("plots")
    assert not (out / "plots").exists() or not any((out / "plots").iterdir())
    assert "data:image/png;base64" not in (out / "report.html").read_text().split("<h2>Per run</h2>")[1]


def test_plot_functions_on_plain_arrays(tmp_path):
    from poisonlab.report.plots import plot_per_class_accuracy, plot_reversed_triggers, plot_strip_entropy

    classes = [f"class {i}" for i in range(12)]
    acc = np.linspace(0, 1, 12)
    acc[3] = np.nan  # a class with no test image: no bar, no error
    p = plot_per_class_accuracy([("clean baseline", acc), ("poisoned", acc[::-1])], classes, tmp_path / "a.png",
                                "t", target=3)
    rng = np.random.default_rng(0)
    m = rng.random((12, 6, 6)).astype(np.float16)  # float masks in [0, 1] work as uint8 ones do
    q = plot_reversed_triggers(m, rng.random((12, 6, 6, 3)), classes, list(range(12)), [0.5] * 12, [1],
                               tmp_path / "b.png", "t")
    r = plot_strip_entropy(rng.random(50), None, 0.2, tmp_path / "c.png", "no trigger: clean only")
    for f in (p, q, r):
        assert f.read_bytes().startswith(b"\x89PNG")
