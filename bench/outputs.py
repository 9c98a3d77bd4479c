"""What every bench script leaves behind: its figures as JSON and its plot as a PNG, side by side
under bench/results/ (not committed: each run's own; docs/benchmarks.md keeps the ones worth it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def figure(rows: int = 1, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib figure drawn off-screen, and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(8, height), sharex=rows > 1)


def save(name: str, data: dict, fig: Any, folder: Path = RESULTS) -> tuple[Path, Path]:
    """`<folder>/<name>.json` and `<folder>/<name>.png`, and says so; the figure is closed."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / f"{name}.json", folder / f"{name}.png"
    json_path.write_text(json.dumps(data, indent=1))
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    print(f"wrote {json_path} and {png_path}")
    return json_path, png_path


def label_axes(ax: Any, *, xlabel: str, ylabel: str, title: str, log2_x: bool = False) -> None:
    """Labels, title and legend of a plot (x on a log-2 scale for counts that double)."""
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
