"""The ``poisonlab`` sub-commands: each public module defines ``register(app: typer.Typer) -> None``.

``_common`` holds what they share (the consoles, the one error printer :func:`fail`, the results
table); :func:`fail` is exported here for the command line's own safety net.
"""

from poisonlab.commands._common import fail

__all__ = ["fail"]
