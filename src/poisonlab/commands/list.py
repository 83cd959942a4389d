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

from poisonlab.commands._common import console

CATALOGUE_VERSION = 2
SECTIONS = ("datasets", "models", "presets", "attacks", "defenses")


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(refresh: bool = typer.Option(False, "--refresh", help="rebuild the cached catalogue")) -> None:
        """List datasets, models (with parameter counts), attacks and defences with their defaults."""
        print_catalogue(catalogue(refresh))


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
    methods = {}
    for section, reg in (("attacks", ATTACKS), ("defenses", DEFENSES)):
        methods[section] = [[name, str(getattr(reg.get(name), "family", None) or getattr(reg.get(name), "kind", "")),
                             ", ".join(f"{k}={v!r}" for k, v in reg.defaults(name).items()), _summary(reg.get(name))]
                            for name in reg.names()]
    errors = [msg for reg in (ATTACKS, DEFENSES, MODELS) for msg in reg.plugin_errors.values()]
    return {"version": CATALOGUE_VERSION, "datasets": datasets, "models": models, "presets": presets, **methods,
            "plugin_errors": errors}


def _summary(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


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
        for row in cat[section]:
            t.add_row(*[Text(x) for x in row])  # plain text: defaults such as "(1, 2)" or "[..]" are not markup
        console.print(t)
    for msg in cat.get("plugin_errors") or []:
        console.print(f"plug-in not loaded: {msg}", highlight=False, markup=False, soft_wrap=True)
