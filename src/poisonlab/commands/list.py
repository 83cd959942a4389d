"""``poisonlab list``: datasets, models (with parameter counts), attacks and defences with their defaults.

Building the catalogue imports every attack, defence and model (torch, scikit-learn) and builds
each model to count its parameters: seconds. So the catalogue is kept as JSON in the user cache
(``$XDG_CACHE_HOME/poisonlab/catalogue/``, or ``$POISONLAB_CACHE_DIR/catalogue/``) under a
fingerprint of poisonlab's own source files (path, size, modification time) and of the installed
plug-ins' entry points; a later ``list`` with the same fingerprint prints it without importing
torch. ``--refresh`` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import typer

from poisonlab.commands._common import FORMAT_HELP, OutputFormat, console, err_console, strict_json, write_stdout

CATALOGUE_VERSION = 3
SECTIONS = ("datasets", "models", "presets", "attacks", "defenses")


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(refresh: bool = typer.Option(False, "--refresh", help="rebuild the cached catalogue"),
                 fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", case_sensitive=False,
                                                  help=FORMAT_HELP)) -> None:
        """List datasets, models (with parameter counts), attacks and defences with their defaults.

        --format json prints {"datasets": [...], "models": [...], "presets": [...], "attacks": [...],
        "defenses": [...]}, one object per entry (see catalogue_records); --format csv prints the same
        entries as one table with a "section" column.
        """
        cat = catalogue(refresh)
        if fmt is OutputFormat.table:
            print_catalogue(cat)
            return
        records = catalogue_records(cat)
        write_stdout(strict_json(records) if fmt is OutputFormat.json else catalogue_csv(records))
        for msg in cat.get("plugin_errors") or []:
            err_console.print(f"plug-in not loaded: {msg}", highlight=False, markup=False, soft_wrap=True)


def catalogue(refresh: bool = False) -> dict[str, Any]:
    """The catalogue: from the cache when its fingerprint matches, else built (and cached)."""
    path = _cache_dir() / f"{fingerprint()}.json"
    if not refresh:
        cached = _read(path)
        if cached is not None:
            return cached
    cat = build_catalogue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from poisonlab.utils import atomic_write_json

        atomic_write_json(path, cat)
    except OSError:  # a read-only home: the catalogue is simply rebuilt next time
        pass
    return cat


def _cache_dir() -> Path:
    # the same user cache directory as poisonlab.data.locate.cache_dir(), spelt out here because
    # importing poisonlab.data would import torch, which is what this cache avoids
    base = os.environ.get("POISONLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "poisonlab")
    return Path(base) / "catalogue"


def fingerprint() -> str:
    """A hash of what the catalogue depends on: poisonlab's source files and the installed plug-ins."""
    from importlib.metadata import entry_points

    from poisonlab.plugins import ENTRY_POINT_GROUPS

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"v{CATALOGUE_VERSION}".encode())
    for f in sorted(root.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for group in sorted(ENTRY_POINT_GROUPS.values()):
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            h.update(f"{group}:{ep.name}={ep.value}:{getattr(dist, 'version', '')}\n".encode())
    return h.hexdigest()[:24]


def _read(path: Path) -> dict[str, Any] | None:
    """A cached catalogue, or None if it is missing or not one this version wrote (then it is rebuilt)."""
    try:
        cat = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(cat, dict) and cat.get("version") == CATALOGUE_VERSION
          and all(isinstance(cat.get(s), list) and all(isinstance(r, list) and all(isinstance(x, str) for x in r)
                                                       for r in cat[s]) for s in SECTIONS))
    return cat if ok else None


def build_catalogue() -> dict[str, Any]:
    """Import the registries (and plug-ins) and describe every entry; rows are lists of strings."""
    from poisonlab.attacks import ATTACKS
    from poisonlab.data import DATASETS
    from poisonlab.defenses import DEFENSES
    from poisonlab.models import MODEL_NOTES, MODELS, build_model, count_parameters
    from poisonlab.plugins import entry_points

    datasets = [[k, v] for k, v in DATASETS.items()]
    datasets += [[k, f"plug-in ({ep.value})"] for k, ep in sorted(entry_points("dataset").items())]
    models = []
    for name in MODELS.names():
        shape = (1, 28) if name == "mnist_cnn" else (3, 32)
        try:
            n = f"{count_parameters(build_model(name, shape[0], 10, shape[1])):,}"
        except Exception:  # noqa: BLE001 - a plug-in model that does not take poisonlab's shape arguments
            n = "-"
        models.append([name, n, MODEL_NOTES.get(name, _summary(MODELS.get(name)))])
    from poisonlab.training.loop import PRESET_SUMMARIES, PRESETS

    presets = [[name, f"{p['epochs']} epochs, batch {p['batch_size']}, {p['optimizer']} lr {p['lr']}",
                PRESET_SUMMARIES.get(name, "")] for name, p in PRESETS.items()]
    from poisonlab.experiments.cache import jsonable

    methods = {}
    for section, reg in (("attacks", ATTACKS), ("defenses", DEFENSES)):
        # the defaults twice: as Python reprs for the table, as JSON for --format json
        methods[section] = [[name, str(getattr(reg.get(name), "family", None) or getattr(reg.get(name), "kind", "")),
                             ", ".join(f"{k}={v!r}" for k, v in reg.defaults(name).items()), _summary(reg.get(name)),
                             json.dumps(jsonable(reg.defaults(name)), default=str)]
                            for name in reg.names()]
    errors = [msg for reg in (ATTACKS, DEFENSES, MODELS) for msg in reg.plugin_errors.values()]
    return {"version": CATALOGUE_VERSION, "datasets": datasets, "models": models, "presets": presets, **methods,
            "plugin_errors": errors}


def _summary(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


# the fields of each section's rows, in order (attacks and defences: the last one is the defaults as JSON)
FIELDS = {"datasets": ("name", "description"), "models": ("name", "parameters", "description"),
          "presets": ("name", "recipe", "description"),
          "attacks": ("name", "kind", "defaults_text", "description", "defaults"),
          "defenses": ("name", "kind", "defaults_text", "description", "defaults")}
CSV_COLUMNS = ("section", "name", "kind", "parameters", "recipe", "defaults", "description")


def catalogue_records(cat: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The catalogue as one object per entry, by section, for scripts.

    Models: ``parameters`` is the parameter count as an integer (null for a plug-in that does not take
    poisonlab's shape arguments). Attacks and defences: ``defaults`` maps each parameter to its default
    (JSON; values JSON cannot hold are their repr).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for section in SECTIONS:
        recs = []
        for row in cat[section]:
            rec: dict[str, Any] = dict(zip(FIELDS[section], row))
            if section == "models":
                count = rec["parameters"].replace(",", "")
                rec["parameters"] = int(count) if count.isdigit() else None
            if "defaults" in rec:
                rec["defaults"] = json.loads(rec["defaults"])
                del rec["defaults_text"]
            recs.append(rec)
        out[section] = recs
    return out


def catalogue_csv(records: dict[str, list[dict[str, Any]]]) -> str:
    """The records as one CSV table: a ``section`` column, then :data:`CSV_COLUMNS` (empty where a section
    has no such field); defaults as a JSON object."""
    import csv
    import io

    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    wr.writeheader()
    for section, recs in records.items():
        for rec in recs:
            row = {"section": section, **rec}
            if isinstance(row.get("defaults"), dict):
                row["defaults"] = json.dumps(row["defaults"])
            wr.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS})
    return buf.getvalue()


def print_catalogue(cat: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    heads = {"datasets": ("datasets", ("name", "description")),
             "models": ("models (parameters on 32x32x3, 10 classes; mnist_cnn on 28x28x1)",
                        ("name", "parameters", "description")),
             "presets": ("training presets ([training] preset = NAME)", ("name", "recipe", "description")),
             "attacks": ("attacks", ("name", "kind", "parameters (defaults)", "summary")),
             "defenses": ("defenses", ("name", "kind", "parameters (defaults)", "summary"))}
    for section in SECTIONS:
        title, cols = heads[section]
        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for row in cat[section]:  # plain text: defaults such as "(1, 2)" or "[..]" are not markup
            t.add_row(*[Text(x) for x in row[:len(cols)]])
        console.print(t)
    for msg in cat.get("plugin_errors") or []:
        console.print(f"plug-in not loaded: {msg}", highlight=False, markup=False, soft_wrap=True)
