"""The examples of docs/own_model_and_data.md and of the README's "Your own model and data" section run."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(python|toml)\n(.*?)```", re.S)


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(text)]


def _run(blocks: list[tuple[str, str]], where: Path, monkeypatch) -> None:
    """Write the ``# file:`` blocks there, then run the Python blocks in order in one namespace."""
    monkeypatch.chdir(where)
    monkeypatch.syspath_prepend(str(where))
    namespace: dict = {"__name__": "__doc_example__"}
    try:
        for lang, body in blocks:
            first = body.splitlines()[0] if body.strip() else ""
            if first.startswith("# file: "):
                f = where / first.removeprefix("# file: ").strip()
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(body)
                if f.parent != where and not (f.parent / "__init__.py").exists():
                    (f.parent / "__init__.py").write_text("")
            elif lang == "python":
                exec(compile(body, f"<{where.name} example>", "exec"), namespace)
    finally:
        for m in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            sys.modules.pop(m)


@pytest.mark.timeout(600)
def test_own_model_and_data_page_runs(tmp_path, monkeypatch):
    blocks = _blocks((REPO / "docs" / "own_model_and_data.md").read_text())
    assert sum(lang == "python" for lang, _ in blocks) >= 8
    _run(blocks, tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "mine" / "results.csv").is_file()


def test_readme_own_model_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks(section)
    assert blocks, "the README section has no example"
    _run(blocks, tmp_path, monkeypatch)
