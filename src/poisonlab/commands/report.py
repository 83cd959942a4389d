"""``poisonlab report DIR``: (re)write the HTML report and the Markdown table of a results directory."""

from __future__ import annotations

from pathlib import Path

import typer

from poisonlab.commands._common import console, fail


def register(app: typer.Typer) -> None:
    @app.command()
    def report(results_dir: Path = typer.Argument(..., help="a directory written by `poisonlab run`")) -> None:
        """(Re)write RESULTS_DIR/report.html (self-contained) and RESULTS_DIR/results.md."""
        from poisonlab.errors import PoisonlabError
        from poisonlab.report.html import write_report

        try:
            html_path, md_path = write_report(results_dir)
        except PoisonlabError as e:
            fail(e)
        console.print(f"wrote {html_path} and {md_path}", highlight=False, markup=False)
