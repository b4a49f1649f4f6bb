"""The survey's figures and summary tables from a results folder (``bdrun report``).

Dunnett et al., arXiv:2411.11200, section VI: box plots of ASR, ARR and RDR per defense
(Fig. 6); median ARR and RDR against median ASR with the rectangles spanned by FP's and FT's
medians (Fig. 7; a defense inside a rectangle beats that baseline on both axes); the same
split by samples per class (Figs. 8-9), attack (Fig. 10), attack type (Fig. 11: static or
dynamic trigger, the survey's Table III), model (Fig. 12), dataset (Fig. 13) and poisoning
ratio (Fig. 14). Only rows with status ok and a defense other than ``none`` are plotted.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

# Trigger consistency of the survey's Table III (static: one trigger for every input)
ATTACK_TYPES = {"badnets": "static", "blended": "static", "sig": "static", "lf": "static", "ssba": "dynamic",
                "inputaware": "dynamic", "bpp": "dynamic", "wanet": "dynamic", "lira": "dynamic"}
METRICS = (("asr_after", "ASR"), ("arr", "ARR"), ("rdr", "RDR"))
SPLITS = (("spc", "samples per class", "fig08_09"), ("attack", "attack", "fig10"),
          ("attack_type", "attack type", "fig11"), ("model", "model", "fig12"), ("dataset", "dataset", "fig13"),
          ("poison_ratio", "poisoning ratio", "fig14"))


def load(results: Path | str) -> pd.DataFrame:
    """The finished defense runs (status ok, defense not ``none``), with their attack type."""
    from bdbench.results import read_results

    return finished(read_results(results).to_pandas())


def finished(table: pd.DataFrame) -> pd.DataFrame:
    df = table[(table["status"] == "ok") & (table["defense"] != "none")].copy()
    df["attack_type"] = df["attack"].map(ATTACK_TYPES).fillna("other")
    return df


def _order(df: pd.DataFrame) -> list[str]:
    return sorted(df["defense"].unique(), key=lambda d: (d not in ("fp", "ft"), d))


def box_plot(df: pd.DataFrame, path: Path, by: str | None = None, label: str = "") -> Path:
    import matplotlib.pyplot as plt

    defenses = _order(df)
    groups = [None] if by is None else sorted(df[by].dropna().unique(), key=str)
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(6, 0.9 * len(defenses) * len(groups)), 8), squeeze=False)
    for ax, (col, name) in zip(axes[:, 0], METRICS):
        data, labels = [], []
        for d in defenses:
            for g in groups:
                sel = df[(df["defense"] == d) & ((df[by] == g) if by else True)][col].dropna()
                data.append(sel.to_numpy())
                labels.append(d if by is None else f"{d}\n{g}")
        ax.boxplot(data, tick_labels=labels, showfliers=True)
        ax.set_ylabel(name)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("per defense" + (f", by {label}" if by else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def medians_plot(df: pd.DataFrame, path: Path, by: str | None = None, label: str = "") -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    med = df.groupby(["defense"] + ([by] if by else []))[["asr_after", "arr", "rdr"]].median().reset_index()
    base = df.groupby("defense")[["asr_after", "arr", "rdr"]].median()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "osD^v<>pPX*"
    groups = sorted(med[by].unique(), key=str) if by else [None]
    for ax, (col, name) in zip(axes, (("arr", "median ARR"), ("rdr", "median RDR"))):
        for baseline, color in (("fp", "tab:blue"), ("ft", "tab:orange")):
            if baseline in base.index:
                b = base.loc[baseline]
                ax.add_patch(Rectangle((0, 0), b["asr_after"], b[col], fill=False, ls="--", ec=color,
                                       label=f"{baseline.upper()} medians"))
        for i, g in enumerate(groups):
            sel = med if g is None else med[med[by] == g]
            ax.scatter(sel["asr_after"], sel[col], marker=markers[i % len(markers)],
                       label=None if g is None else f"{label} {g}")
            for _, r in sel.iterrows():
                ax.annotate(r["defense"], (r["asr_after"], r[col]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("median ASR")
        ax.set_ylabel(name)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=min(0, float(med[col].min()) if len(med) else 0))
        ax.legend(fontsize=7)
    fig.suptitle("medians per defense" + (f", by {label}" if by else "") + " (bottom-left is best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Medians per defense, and the interquartile range of ASR after it: the spread the survey
    reads as a defense's consistency across attacks, budgets and models (Fig. 6)."""
    cols = ["acc_after", "asr_after", "ra_after", "arr", "rdr", "defense_seconds"]
    grouped = df.groupby("defense")
    out = grouped[cols].median().rename(columns=lambda c: f"median {c}")
    asr = grouped["asr_after"]
    out.insert(out.columns.get_loc("median asr_after") + 1, "IQR asr_after", asr.quantile(0.75) - asr.quantile(0.25))
    out.insert(0, "runs", grouped.size())
    return out.loc[_order(df)].round(3)


def _not_plotted(table: pd.DataFrame) -> str:
    """The rows left out of the figures, by status (an attack under the preset's floor, a failure)."""
    other = table[table["status"] != "ok"]["status"].value_counts()
    if other.empty:
        return ""
    return "Not plotted: " + ", ".join(f"{n} {html.escape(str(status))}" for status, n in other.items()) + " rows."


def build(results: Path | str, out: Path | str) -> Path:
    """Write the figures (PNG) and ``index.html`` with the summary tables into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from bdbench.errors import BdbenchError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from bdbench.results import read_results

    table = read_results(results).to_pandas()
    df = finished(table)
    if df.empty:
        raise BdbenchError(f"{results}: no finished defense runs to report")
    figures = [("Fig. 6: ASR, ARR and RDR per defense", box_plot(df, out / "fig06_box.png")),
               ("Fig. 7: medians against the FP and FT baselines", medians_plot(df, out / "fig07_medians.png"))]
    for col, label, stem in SPLITS:
        if df[col].nunique() > 1:
            figures.append((f"By {label}: distributions", box_plot(df, out / f"{stem}_box.png", col, label)))
            figures.append((f"By {label}: medians", medians_plot(df, out / f"{stem}_medians.png", col, label)))
    by_attack = df.pivot_table(index="defense", columns="attack", values="asr_after", aggfunc="median").round(3)
    parts = ["<!doctype html><meta charset='utf-8'><title>bdbench report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>",
             f"<h1>bdbench report</h1><p>{len(df)} defense runs from <code>{html.escape(str(results))}</code>: "
             f"{df['attack'].nunique()} attacks, {df['defense'].nunique()} defenses, "
             f"{df['dataset'].nunique()} datasets, {df['model'].nunique()} models, seeds "
             f"{', '.join(map(str, sorted(df['seed'].unique())))}.",
             _not_plotted(table), "</p>",
             "<h2>Summary per defense</h2>", summary(df).to_html(),
             "<h2>Median ASR after defense, per attack</h2>", by_attack.to_html()]
    for title, path in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{path.name}' style='max-width:100%'>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index
