"""Writing matplotlib figures: laid out, written atomically as PNG, and closed so long runs don't leak them."""
from __future__ import annotations

import os

from core.atomic import atomic_path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
