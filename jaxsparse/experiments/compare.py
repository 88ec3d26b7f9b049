"""``jaxsparse compare RESULTS...``: the results of one or more runs as one
table (mean ± std over seeds) and PNG plots of accuracy against sparsity
per method and of each layer's sparsity."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Reads results files written by ``jaxsparse run``.

    Raises:
      ValueError: a file is missing or is not a results file.
    """
    docs = []
    for path in paths:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable results file ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise ValueError(f"{path}: not a results file of jaxsparse run")
        docs.append(doc)
    return docs


def _groups(docs) -> dict[tuple[str, str, float | None], list[dict[str, Any]]]:
    """Rows by (results, method, target); a method without a target (a
    regularizer reaches what its strength gives) is one group."""
    groups: dict[tuple[str, str, float | None], list] = defaultdict(list)
    for doc in docs:
        for row in doc["rows"]:
            target = row.get("target")
            key = (
                doc["name"],
                str(row["method"]),
                None if target is None else float(target),
            )
            groups[key].append(row)
    return groups


def _spread(values: list[float]) -> str:
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.2%} ± {std:.2%}"


def compare_table(docs: list[dict[str, Any]]) -> str:
    """One line per (results, method, target): sparsity and accuracy, mean
    ± sample std over seeds."""
    header = ("results", "method", "target", "sparsity", "accuracy", "seeds")
    lines = [header]
    for (name, method, target), rows in _groups(docs).items():
        lines.append(
            (
                name,
                method,
                "-" if target is None else f"{target:.0%}",
                f"{np.mean([r['sparsity'] for r in rows]):.2%}",
                _spread([r["accuracy"] for r in rows]),
                str(len(rows)),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def plot_results(docs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Writes ``accuracy.png`` (accuracy against sparsity, one line per
    method, error bars over seeds) and, when rows carry per-layer
    sparsities, ``layers.png`` (each layer's sparsity per method at its
    highest target) into ``out``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list] = defaultdict(list)
    for (name, method, _), rows in _groups(docs).items():
        label = method if len(docs) == 1 else f"{name}: {method}"
        acc = [r["accuracy"] for r in rows]
        lines[label].append(
            (np.mean([r["sparsity"] for r in rows]), np.mean(acc), np.std(acc))
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        s, a, e = np.array(sorted(points)).T
        ax.errorbar(s * 100, a * 100, yerr=e * 100, marker="o", capsize=3, label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written = [out / "accuracy.png"]
    fig.tight_layout()
    fig.savefig(written[0], dpi=120)
    plt.close(fig)

    layered = {}
    for (name, method, target), rows in _groups(docs).items():
        if "layers" not in rows[0] or target is None:
            continue
        label = method if len(docs) == 1 else f"{name}: {method}"
        if label not in layered or target > layered[label][0]:
            layered[label] = (target, rows[0]["layers"])
    if layered:
        layers = list(dict.fromkeys(k for _, d in layered.values() for k in d))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers)), 4))
        width = 0.8 / len(layered)
        for i, (label, (target, sparsity)) in enumerate(layered.items()):
            x = np.arange(len(layers)) + i * width
            ax.bar(
                x,
                [100 * sparsity.get(k, 0.0) for k in layers],
                width,
                label=f"{label} ({target:.0%})",
            )
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=20)
        ax.set_ylabel("sparsity (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "layers.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
