"""``poisonlab audit DIR --out OUT``: find likely mislabelled images and trigger clusters in an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from poisonlab.commands._common import console, fail


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        folder: Path = typer.Argument(..., help="image folder, one sub-folder per class"),
        out: Path = typer.Option(Path("audit"), "--out", "-o", help="output directory"),
        folds: int = typer.Option(4, help="cross-validation folds"),
        epochs: Optional[int] = typer.Option(None, help="training epochs per fold (default: 10 for airnet's recipe; "
                                                  "fastnet: 20 under bf16 autocast, else 8)"),
        model: str = typer.Option("auto", help="network trained on the folds (see `poisonlab list`); auto: airnet "
                                  "with the airbench_quick recipe on images of 16 pixels or more, else fastnet"),
        image_size: int = typer.Option(32, "--image-size", help="images are resized to this square size"),
        grayscale: bool = typer.Option(False, "--grayscale", help="read images as one channel"),
        min_confidence: float = typer.Option(0.55, "--min-confidence",
                                             help="flag a label issue only if the suggested class is this probable"),
        min_pair_share: float = typer.Option(0.06, "--min-pair-share",
                                             help="flag a label issue only if its (given, suggested) pair holds this "
                                                  "share of the given class (or the model is all but certain) ..."),
        min_pair_concentration: float = typer.Option(
            0.8, "--min-pair-concentration",
            help="... and this share of the class's label issues (0 and --min-pair-share 0: every label issue, "
                 "for scattered random noise)"),
        class_excess: bool = typer.Option(True, "--class-excess/--no-class-excess",
                                          help="report a trigger cluster only in a class larger than the median "
                                               "class by about the cluster's size"),
        bf16: str = typer.Option("auto", help="bf16 autocast while training the fold models: auto, on or off"),
        seed: int = typer.Option(0, help="random seed"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ) -> None:
        """Audit an image folder: writes OUT/suspicious.csv (one row per image) and OUT/report.html."""
        from poisonlab.audit import AuditConfig, audit_folder
        from poisonlab.errors import ParameterError, PoisonlabError

        if not folder.is_dir():
            fail(f"{folder}: not a directory")
        # checked before the cross-validation, so that no work is lost to a bad --out or size
        if out.exists() and not out.is_dir():
            fail(f"--out {out}: exists and is not a directory")
        if out.resolve().is_relative_to(folder.resolve()):
            fail(f"--out {out}: inside the audited folder {folder} (it would be read as a class next time); "
                 "write the audit elsewhere")
        if not 4 <= image_size <= 1024:
            fail(f"--image-size must be in [4, 1024], got {image_size}")
        try:
            if bf16 not in ("auto", "on", "off"):
                raise ParameterError(f"--bf16 must be auto, on or off, got {bf16!r}")
            cfg = AuditConfig(folds=folds, epochs=epochs, model=model, min_confidence=min_confidence,
                              min_pair_share=min_pair_share, min_pair_concentration=min_pair_concentration,
                              require_class_excess=class_excess,
                              bf16={"auto": None, "on": True, "off": False}[bf16], seed=seed)
            res = audit_folder(folder, out, cfg, image_size=image_size, channels=1 if grayscale else 3,
                               progress=not quiet, log=lambda s: console.print(s, highlight=False, markup=False))
        except PoisonlabError as e:
            fail(e)
        n_mis = sum(f == "mislabelled" for f in res.finding)
        n_trg = sum(f == "trigger" for f in res.finding)
        console.print(f"{int(res.flagged.sum())} of {len(res.data)} images flagged: {n_mis} likely mislabelled, "
                      f"{n_trg} in likely trigger clusters; {len(res.unreadable)} unreadable", markup=False)
        console.print(f"wrote {out / 'suspicious.csv'} and {out / 'report.html'}", highlight=False, markup=False)
