"""``poisonlab federated CONFIG --out DIR``: federated poisoning on Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from poisonlab.commands._common import console, fail, print_summary


def register(app: typer.Typer) -> None:
    @app.command()
    def federated(
        config: Path = typer.Argument(..., help="federated experiment config (.toml or .yaml)"),
        out: Path = typer.Option(Path("runs/federated"), "--out", "-o", help="output directory"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where datasets live"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="show Flower's per-round log"),
    ) -> None:
        """Federated learning with malicious clients and robust aggregators (Flower simulation); results to OUT."""
        from poisonlab.errors import PoisonlabError

        try:
            from poisonlab.federated.config import load_federated_config
            from poisonlab.federated.simulation import run_federated

            cfg = load_federated_config(config)
            rows = run_federated(cfg, out, str(data_dir) if data_dir else None,
                                 log=lambda s: console.print(s, highlight=False, markup=False), verbose=verbose)
        except PoisonlabError as e:
            fail(e)
        except ImportError as e:
            fail(RuntimeError(f"{e}: install the federated extra (pip install -e '.[federated]')"))
        print_summary(rows)
        console.print(f"results: {out / 'results.csv'}  (per round: {out / 'rounds.csv'}, plots in {out / 'plots'})",
                      highlight=False, markup=False)
