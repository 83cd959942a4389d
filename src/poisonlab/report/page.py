"""Self-contained HTML pages: the one page skeleton and image embedding of report.html and the audit's page.

A page has no external resource: styles and scripts are inline, images are
``data:`` URIs, every piece of text from the data is escaped by the caller
with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Iterable

import numpy as np

BASE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
"""


def html_page(title: str, body: Iterable[str], css: str = "", script: str = "") -> str:
    """A complete HTML document: ``title`` (escaped here), :data:`BASE_CSS` + ``css``, the ``body``
    fragments (already HTML) one per line, and an optional inline ``script`` at the end."""
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{BASE_CSS}{css}</style></head><body>")
    tail = (f"<script>{script}</script>" if script else "") + "</body></html>"
    return "\n".join([head, *body, tail])


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_data_uri(image: np.ndarray, scale: int = 1) -> str:
    """A uint8 ``(H, W, C)`` image (C = 1 or 3) as a PNG data URI, enlarged ``scale`` times (nearest pixel)."""
    from PIL import Image

    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return png_data_uri(buf.getvalue())
