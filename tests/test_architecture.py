"""The shape of the code: the import graph, private names, and a command line that answers at once."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "sklearn", "matplotlib")


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "poisonlab").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every import in the file, lazy ones included."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1] + ([base] if base else []))
            out += [(base, a.name) for a in node.names]
    return out


def _package(name: str, modules: dict[str, Path]) -> str:
    return name if modules[name].name == "__init__.py" else name.rsplit(".", 1)[0]


def test_no_import_cycle_between_report_and_experiments_nor_cli_and_commands():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for mod, _ in _imports(name, path):
            if name.startswith("poisonlab.report") and mod.startswith("poisonlab.experiments"):
                bad.append(f"{name} imports {mod}")
            if name.startswith("poisonlab.commands") and mod.startswith("poisonlab.cli"):
                bad.append(f"{name} imports {mod}")
    assert not bad, bad


def test_no_module_imports_another_packages_private_name():
    """``_x`` modules and names are used only inside the package (or sub-packages) that defines them."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        importer = _package(name, modules)
        for mod, attr in _imports(name, path):
            if not mod.startswith("poisonlab"):
                continue
            parts = mod.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_")]
            if private:  # a private module: its parent package owns it
                owner = ".".join(parts[: private[0]])
                if not (importer == owner or importer.startswith(owner + ".")):
                    bad.append(f"{name} imports {mod}")
            if attr and attr.startswith("_") and mod in modules:
                owner = _package(mod, modules)
                if not (importer == owner or importer.startswith(owner + ".")):
                    bad.append(f"{name} imports {attr} from {mod}")
    assert not bad, bad


def _loaded_after(code: str, env: dict | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('LOADED:', *(m for m in "
                          f"{HEAVY!r} if m in sys.modules))"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(SRC), **(env or {})))
    assert out.returncode == 0, out.stderr
    return out.stdout.rsplit("LOADED:", 1)[1].split()


def test_help_and_import_load_no_torch_sklearn_or_matplotlib():
    code = ("import sys\nsys.argv = ['poisonlab', '--help']\nfrom poisonlab.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nimport poisonlab")
    assert _loaded_after(code) == []


@pytest.mark.timeout(600)
def test_list_from_the_cached_catalogue_loads_no_torch(tmp_path):
    env = {"POISONLAB_CACHE_DIR": str(tmp_path)}
    run = ("import sys\nsys.argv = ['poisonlab', 'list']\nfrom poisonlab.cli import main\n"
           "try:\n    main()\nexcept SystemExit:\n    pass")
    assert "torch" in _loaded_after(run, env)  # the first call builds the catalogue
    assert len(list((tmp_path / "catalogue").glob("*.json"))) == 1
    assert _loaded_after(run, env) == []  # the second prints it from the cache
    (next((tmp_path / "catalogue").glob("*.json"))).write_text('{"version": 1, "models": "tampered"}')
    assert "torch" in _loaded_after(run, env)  # a damaged cache file is rebuilt, not trusted
