"""Matplotlib for files, the one way: a headless backend, atomic PNG writes.

Every plot medfuse writes (the simulation report, the audit's ROC, the prediction
pictures, the benchmark) goes through these two functions, so none of them needs a
display and none leaves half a PNG behind.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from shared_model.files import atomic_write


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow)."""
    import matplotlib  # lazy: matplotlib is slow (0.2 s); loads where a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, and only once the backend is Agg

    return plt


def save_png(fig: Any, path: Path, dpi: int = 100, palette: bool = False) -> Path:
    """Write `fig` to `path` atomically as PNG and close it. `palette`: at most 256
    colours, a third of the full-colour file with heat maps and text still clear (for
    pictures written a few hundred at a time)."""
    if not palette:
        atomic_write(Path(path), lambda fh: fig.savefig(fh, dpi=dpi, format="png"))
    else:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        with Image.open(buffer) as picture:
            paletted = picture.convert("RGB").quantize(256)
        atomic_write(Path(path), lambda fh: paletted.save(fh, format="PNG", optimize=True))
    pyplot().close(fig)
    return Path(path)
