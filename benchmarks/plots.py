"""Plots of the benchmark results, drawn from the committed JSON in `benchmarks/results/` (matplotlib: the `bench`
extra). One function per plot; each reads its JSON and writes one PNG (default: `docs/assets/plots/`).

    python benchmarks/plots.py            # all plots from the committed results
    python benchmarks/plots.py oneshot    # one of them: oneshot, cofi, recover

The benchmark scripts call the matching function at the end of a run when given `--plot`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOTS = HERE.parent / "docs" / "assets" / "plots"

ONESHOT_METHODS = {"admm": "ADMM", "sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}
COFI_SETTING = "ort_1t"  # ONNX Runtime, one intra-op thread: the setting of the CoFi speed-up target
COFI_BATCHES = {"b1": "batch 1", "b32": "batch 32"}
PLOT_FILES = {"oneshot": "oneshot_perplexity.png", "cofi": "cofi_accuracy_speedup.png",
              "recover": "recovery_perplexity.png"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the benchmark plots need matplotlib: pip install 'hf_prune[bench]'") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark results {str(path)!r} not found; run the benchmark first")
    return json.loads(path.read_text())


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # no timestamp in the metadata: regenerating from the same JSON gives the same file
    fig.savefig(out, dpi=130, metadata={"Software": None})
    fig.clf()
    return out


def plot_oneshot(results: Path = RESULTS / "oneshot_smollm2.json", out: Path = PLOTS / PLOT_FILES["oneshot"]) -> Path:
    """Held-out perplexity (log scale) against sparsity, one line per one-shot method; 2:4 as open markers at 50 %."""
    plt = _pyplot()
    data = _read(Path(results))
    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r["perplexity"] for r in runs if r["method"] == "dense"), None)
    for i, (method, label) in enumerate(ONESHOT_METHODS.items()):
        color = f"C{i}"
        rows = sorted((float(r["setting"]), r["perplexity"]) for r in runs
                      if r["method"] == method and r["setting"].replace(".", "", 1).isdigit())
        if rows:
            ax.plot([100 * s for s, _ in rows], [p for _, p in rows], "o-", color=color, label=f"{label} (unstructured)")
        nm = [r["perplexity"] for r in runs if r["method"] == method and r["setting"] == "2:4"]
        if nm:
            # side by side around 50 %, so equal values stay visible
            ax.plot([50 + 0.8 * (i - 1.5)] * len(nm), nm, "s", mfc="none", ms=8, mew=1.6, color=color,
                    label=f"{label} 2:4")
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned linear layers (%)")
    ax.set_ylabel("held-out perplexity (log scale; lower is better)")
    proto = data.get("protocol", {})
    tokens = proto.get("eval_tokens")
    ax.set_title("SmolLM2-135M one-shot pruning" + (f": perplexity on {tokens:,} held-out Wikipedia tokens" if tokens else ""),
                 fontsize=10)
    ax.set_xticks(sorted({100 * float(r["setting"]) for r in runs if r["setting"].replace(".", "", 1).isdigit()} | {50}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, Path(out))


def plot_cofi(results: Path = RESULTS / "cofi_minilm.json", out: Path = PLOTS / PLOT_FILES["cofi"],
              setting: str = COFI_SETTING) -> Path:
    """Accuracy against measured speed-up over the dense teacher, one panel per batch size, one point per model."""
    plt = _pyplot()
    data = _read(Path(results))
    rows = [r for r in data["rows"] if isinstance(r.get("speedup"), dict) and setting in r["speedup"]]
    if not rows:
        raise ValueError(f"{results}: no row has a speed-up for the setting {setting!r}")
    fig, axes = plt.subplots(1, len(COFI_BATCHES), figsize=(10, 4.2), sharey=True)
    for ax, (batch, batch_label) in zip(axes, COFI_BATCHES.items()):
        for i, r in enumerate(rows):
            x, y = r["speedup"][setting][batch], 100 * r["accuracy"]
            ax.plot(x, y, "o", color="black" if r.get("sparsity", 0) == 0 else f"C{i}", ms=7)
            ax.annotate(r["model"].split(" (")[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ticks = [t for t in (1, 2, 4, 8, 16) if t <= 1.3 * max(r["speedup"][setting][b] for r in rows for b in COFI_BATCHES)]
        ax.set_xticks(ticks, [f"{t}×" for t in ticks])
        ax.set_xlabel(f"speed-up over the dense teacher (×, log scale), {batch_label}")
        ax.set_title(f"{batch_label}, ONNX Runtime, 1 thread" if setting == "ort_1t" else f"{batch_label}, {setting}",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("CoFi on MiniLM-L6 (Rotten Tomatoes sentiment): accuracy vs measured speed-up", fontsize=11)
    return _save(fig, Path(out))


def plot_recovery(results: Path = RESULTS / "recover_smollm2.json", out: Path = PLOTS / PLOT_FILES["recover"]) -> Path:
    """Held-out perplexity of each ADMM-pruned SmolLM2 before and after masked-LoRA recovery, with the dense model."""
    plt = _pyplot()
    data = _read(Path(results))
    runs = [r for r in data["runs"] if r.get("mode") == "masked LoRA"]
    if not runs:
        raise ValueError(f"{results}: no masked-LoRA rows")
    runs.sort(key=lambda r: (r["setting"] != "2:4", r["setting"]))
    dense = next((r["perplexity"] for r in data["runs"] if r.get("row") == "dense"), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = range(len(runs))
    width = 0.38
    before = ax.bar([x - width / 2 for x in xs], [r["perplexity_pruned"] for r in runs], width, color="C3",
                    label="ADMM-pruned")
    after = ax.bar([x + width / 2 for x in xs], [r["perplexity_recovered"] for r in runs], width, color="C2",
                   label="after masked LoRA (mask kept)")
    for bars in (before, after):
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense ({dense:.1f})")
    ax.set_xticks(list(xs), [r["setting"] if r["setting"] == "2:4" else f"{100 * float(r['setting']):.0f} %"
                             for r in runs])
    ax.set_xlabel("sparsity pattern")
    ax.set_ylabel("held-out perplexity (lower is better)")
    proto = data.get("protocol", {})
    steps = proto.get("steps")
    ax.set_title("SmolLM2-135M: recovery with masked LoRA" + (f" ({steps} steps)" if steps else ""), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out))


def plot_perplexity_vs_throughput(rows: list[dict], out: Path, title: str = "Perplexity vs decoding speed") -> Path:
    """Perplexity (log scale) against tokens/s, one labelled point per row, for the structured-decoder benchmark.

    Args:
        rows: dicts with `label`, `perplexity` and `tokens_per_s` (the dense model's label starting with "dense"
            is drawn in black).
        out: the PNG to write.
    """
    plt = _pyplot()
    missing = [i for i, r in enumerate(rows) if not {"label", "perplexity", "tokens_per_s"} <= set(r)]
    if not rows or missing:
        raise ValueError(f"rows need 'label', 'perplexity' and 'tokens_per_s'; rows {missing} lack some")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(rows):
        color = "black" if str(r["label"]).startswith("dense") else f"C{i}"
        ax.plot(r["tokens_per_s"], r["perplexity"], "o", color=color)
        ax.annotate(r["label"], (r["tokens_per_s"], r["perplexity"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("decoding speed (tokens/s; higher is better)")
    ax.set_ylabel("held-out perplexity (log scale; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, Path(out))


PLOTS_FROM_RESULTS = {"oneshot": plot_oneshot, "cofi": plot_cofi, "recover": plot_recovery}
DEFAULT_RESULTS = {"oneshot": "oneshot_smollm2.json", "cofi": "cofi_minilm.json", "recover": "recover_smollm2.json"}


def plot_after_run(name: str, results) -> Path:
    """The `--plot` of a benchmark script: the committed PNG in `docs/assets/plots/` for the default results file,
    a PNG next to the JSON for any other (a shortened protocol never replaces the committed plot)."""
    results = Path(results).resolve()
    default = results == (RESULTS / DEFAULT_RESULTS[name]).resolve()
    out = PLOTS / PLOT_FILES[name] if default else results.with_suffix(".png")
    return PLOTS_FROM_RESULTS[name](results, out=out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plots", nargs="*", help=f"which plots: {', '.join(PLOTS_FROM_RESULTS)} (default: all)")
    p.add_argument("--out-dir", type=Path, default=PLOTS, help="where to write the PNGs")
    args = p.parse_args(argv)
    unknown = sorted(set(args.plots) - set(PLOTS_FROM_RESULTS))
    if unknown:
        p.error(f"unknown plot {', '.join(unknown)}; choose from {', '.join(PLOTS_FROM_RESULTS)}")
    for name in args.plots or PLOTS_FROM_RESULTS:
        print(PLOTS_FROM_RESULTS[name](out=args.out_dir / PLOT_FILES[name]))


if __name__ == "__main__":
    main()
