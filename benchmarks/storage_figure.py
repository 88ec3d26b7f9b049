"""The survey's storage comparison (Hoefler et al. 2021, §2.2, Fig. 5) from
jaxsparse's analytical model: bits per format against sparsity for
``n = 10^8`` slots of ``k = 8`` bits, non-zeros at uniformly random
positions (CSR/CSC as a 10^4 x 10^4 matrix). Saves ``storage_formats.png``
and prints where each format is cheapest.

Run: pip install -e ".[plots]" && python benchmarks/storage_figure.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsparse import storage as S

N, K = 10**8, 8
SHOWN = ("dense", "bitmap", "coo", "delta", "padded_delta", "csr")


def cheapest(grid):
    return [S.best_format(N, N - round(s * N), K)[0] for s in grid]


def main(out: Path = Path(__file__).with_name("storage_formats.png")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.round(np.arange(0, 0.99995, 1e-4), 4)
    best = cheapest(grid)
    start = 0
    for i in range(1, len(grid) + 1):
        if i == len(grid) or best[i] != best[start]:
            print(f"{grid[start]:.2%} - {grid[i - 1]:.2%}: {best[start]}")
            start = i
    sparsity = 1 - np.logspace(0, -4, 400)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in SHOWN:
        mb = [S.model_bits(name, N, N - round(s * N), K) / 8e6 for s in sparsity]
        ax.plot(sparsity * 100, mb, label=name)
    ax.set_xscale(
        "function",
        functions=(lambda x: -np.log10(100.001 - x), lambda y: 100.001 - 10 ** (-y)),
    )
    ticks = [0, 90, 99, 99.9, 99.99]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("storage (MB)")
    ax.set_title("n = 1e8 values of 8 bits (jaxsparse model)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
