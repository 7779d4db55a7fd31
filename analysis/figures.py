"""The report's figures: one function per figure, each writing a PNG and returning its path.

A function whose data are missing draws nothing and returns ``None``.  Figures are made with
``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot state), so they are safe in a server
or a test process.  Curves are one per ``series`` (pruning method, with the schedule when a method
has several); the unpruned base model starts every curve.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .descriptives import wilson_interval
from .load import BASE_METHOD, base_at_chance

DPI = 110
CHANCE = 0.5


def _figure(nrows: int = 1, ncols: int = 1, size=(5.2, 3.8), squeeze_unused: int | None = None, **kw):
    """A figure with an ``nrows × ncols`` grid of axes; with ``squeeze_unused = n`` the panels of the
    last block of columns beyond ``n`` panels per row-group are hidden (wrapped panel layouts)."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    if squeeze_unused is not None and squeeze_unused % ncols:
        blocks = -(-squeeze_unused // ncols)
        rows_per_block = nrows // blocks
        for r in range(nrows - rows_per_block, nrows):
            for c in range(squeeze_unused % ncols, ncols):
                axes[r][c].set_visible(False)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def series_colors(series) -> dict[str, tuple]:
    """A stable colour per series (tab10 in sorted order; the base model black)."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    names = sorted({s for s in series if s != BASE_METHOD and isinstance(s, str)})
    colors = {s: cmap(i % 10) for i, s in enumerate(names)}
    colors[BASE_METHOD] = (0.0, 0.0, 0.0, 1.0)
    return colors


def _curves(frame: pd.DataFrame):
    """``(series, rows)`` for every pruned series, the base rows prepended and sorted by sparsity."""
    if frame.empty or "series" not in frame:
        return
    base = frame[frame["series"] == BASE_METHOD]
    for s in sorted(x for x in frame["series"].dropna().unique() if x != BASE_METHOD):
        rows = pd.concat([base, frame[frame["series"] == s]]).sort_values("sparsity")
        yield s, rows
    if not (frame["series"] != BASE_METHOD).any() and len(base):
        yield BASE_METHOD, base


def _joined(rows: pd.DataFrame) -> str:
    """The line style of a curve: solid from the base to its points, none for a series at sparsity 0 only (the
    retrained control), whose line from the base would be a vertical stroke that reads as an error bar."""
    own = rows[rows["series"] != BASE_METHOD]["sparsity"].astype(float) if "series" in rows else rows["sparsity"]
    return "-" if (own > 0).any() else "none"


def _mark_base(ax, rows: pd.DataFrame, y: str, lo: str | None = None, hi: str | None = None, **kw) -> None:
    """The base model's point(s), drawn once in black above the curves that start from it (each curve draws
    it too, in the curve's colour, under this one), labelled "base" in the legend."""
    base = _finite(rows[rows["series"] == BASE_METHOD], y, "sparsity") if "series" in rows else rows.iloc[:0]
    if base.empty:
        return
    kw = {"marker": "o", "color": "black", "ls": "none", "zorder": 5, "label": "base", **kw}
    if lo is not None and lo in base and hi in base:
        _errorbar(ax, base["sparsity"], base[y], base[lo], base[hi], **kw)
    else:
        ax.plot(base["sparsity"], base[y], **kw)


def _finite(frame: pd.DataFrame, *cols) -> pd.DataFrame:
    if frame is None or frame.empty or any(c not in frame for c in cols):
        return pd.DataFrame()
    return frame[np.isfinite(frame[list(cols)].astype(float)).all(axis=1)]


#: horizontal spread, in sparsity units, of the curves' points at one sparsity, so their error bars do not overlap
DODGE_WIDTH = 0.04


def dodge(rows: pd.DataFrame, index: int, count: int, width: float = DODGE_WIDTH) -> np.ndarray:
    """The rows' sparsity, pruned models' points shifted by the ``index``-th of ``count`` evenly spaced offsets
    spanning ``width`` (centred on 0); base-model points, shared by every curve, stay where they are."""
    x = rows["sparsity"].to_numpy(dtype=float)
    if count < 2:
        return x
    shift = (index / (count - 1) - 0.5) * width
    base = (rows["series"] == BASE_METHOD).to_numpy() if "series" in rows else np.zeros(len(x), bool)
    return np.where(base, x, x + shift)


def _errorbar(ax, x, y, lo, hi, **kw):
    y, lo, hi = (np.asarray(v, dtype=float) for v in (y, lo, hi))
    err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
    err = np.where(np.isfinite(err), err, 0.0)
    ax.errorbar(x, y, yerr=err, capsize=3, **kw)


def _legend_outside(ax, fontsize: int = 7, **kw) -> None:
    """The legend right of ``ax``, outside the data (the constrained layout makes room for it), of every
    labelled artist of the figure: a series missing from ``ax``'s own panel keeps its entry."""
    entries: dict[str, object] = {}
    for panel in ax.figure.axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    ax.legend(list(entries.values()), list(entries), fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, **kw)


def _chance(ax, label: bool = True):
    ax.axhline(CHANCE, color="0.5", lw=1, ls=":", label="chance" if label else None, zorder=0)


def interpretability_vs_sparsity(mis_models: pd.DataFrame, human: pd.DataFrame | None, path) -> Path | None:
    """MIS (bootstrap 95 % CI over units) and human accuracy (Wilson 95 % CI) vs measured sparsity, one
    panel per reference kind, one curve per series, with the 0.5 chance line."""
    mis = _finite(mis_models, "mis", "sparsity")
    hum = _finite(human if human is not None else pd.DataFrame(), "accuracy", "sparsity")
    if mis.empty and hum.empty:
        return None
    kinds = sorted(set(mis.get("kind", pd.Series(dtype=str))) | set(hum.get("kind", pd.Series(dtype=str))))
    colors = series_colors(list(mis.get("series", [])) + list(hum.get("series", [])))
    fig, axes = _figure(1, len(kinds))
    order = sorted(s for s in colors if s != BASE_METHOD)
    for ax, kind in zip(axes[0], kinds):
        own_mis = mis[mis["kind"] == kind] if len(mis) else mis
        own_hum = hum[hum["kind"] == kind] if len(hum) else hum
        if len(own_mis):
            _mark_base(ax, own_mis, "mis", "mis_ci_low", "mis_ci_high", label="MIS · base")
        if len(own_hum):
            _mark_base(ax, own_hum, "accuracy", "wilson_low", "wilson_high", marker="s", mfc="white",
                       label="humans · base")
        for s, rows in _curves(own_mis):
            _errorbar(ax, dodge(rows, order.index(s) if s in order else 0, len(order)), rows["mis"],
                      rows.get("mis_ci_low", rows["mis"]), rows.get("mis_ci_high", rows["mis"]), color=colors[s],
                      marker="o", ls=_joined(rows), label=f"MIS · {s}")
        for s, rows in _curves(own_hum):
            _errorbar(ax, dodge(rows, order.index(s) if s in order else 0, len(order)), rows["accuracy"],
                      rows.get("wilson_low", rows["accuracy"]),
                      rows.get("wilson_high", rows["accuracy"]), color=colors[s], marker="s",
                      ls="--" if _joined(rows) == "-" else "none", mfc="white", label=f"humans · {s}")
        low, high = _proportion_range(own_mis, own_hum)
        if low < CHANCE < high:
            _chance(ax)
        ax.set(title=f"{kind} references", xlabel="sparsity (measured, after retraining)",
               ylim=(low, high), xlim=(-0.03, 1.0))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("proportion correct  /  MIS" if len(hum) else "MIS")
    _legend_outside(axes[0][-1])
    return _save(fig, path)


#: the least y span of an MIS / accuracy panel (four equivalence margins of 0.05), so a zoomed panel does not
#: make differences of a few thousandths look large
MIN_SPAN = 0.2


def _proportion_range(*frames) -> tuple[float, float]:
    """The y range of one panel of proportions: its points and intervals with a margin, at least
    :data:`MIN_SPAN` wide, inside [0, 1.02]."""
    values = [f[c].to_numpy(float) for f in frames if len(f)
              for c in ("mis", "mis_ci_low", "mis_ci_high", "accuracy", "wilson_low", "wilson_high") if c in f]
    values = np.concatenate(values) if values else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.3, 1.02
    low, high = float(values.min()) - 0.02, float(values.max()) + 0.02
    if high - low < MIN_SPAN:
        middle = (low + high) / 2
        low, high = middle - MIN_SPAN / 2, middle + MIN_SPAN / 2
    if high > 1.02:
        low, high = low - (high - 1.02), 1.02
    return max(0.0, low), high


def top1_vs_sparsity(models: pd.DataFrame, path, chance: float | None = None) -> Path | None:
    """Top-1 accuracy vs sparsity per series: after retraining (solid), before retraining (dotted); with
    ``chance`` (1 / classes) its line, where a model that predicts one class for every image lands."""
    data = _finite(models, "top1", "sparsity")
    if data.empty:
        return None
    colors = series_colors(data["series"])
    order = sorted(s for s in colors if s != BASE_METHOD)
    fig, axes = _figure()
    ax = axes[0][0]
    _mark_base(ax, data, "top1")
    for s, rows in _curves(data):
        index = order.index(s) if s in order else 0
        ax.plot(dodge(rows, index, len(order)), rows["top1"], marker="o", color=colors[s], ls=_joined(rows),
                label=f"{s}")
        before = _finite(rows, "top1_before")
        before = before[before["method"] != BASE_METHOD] if len(before) else before
        if len(before):
            ax.plot(dodge(before, index, len(order)), before["top1_before"], marker=".", ls=":", color=colors[s],
                    alpha=0.7)
    if chance is not None:
        ax.axhline(chance, color="0.5", lw=1, ls="--", label=f"chance ({chance:.2g})", zorder=0)
    ax.set(xlabel="sparsity (measured)", ylabel="top-1 accuracy (validation)",
           title="top-1 after retraining", xlim=(-0.03, 1.0), ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def layer_mis_vs_sparsity(units: pd.DataFrame, path, max_cols: int = 5) -> Path | None:
    """Per-layer panels, one row of them per reference kind: mean MIS over the layer's units (± SEM) vs
    sparsity, one curve per series (layers wrap after ``max_cols`` panels)."""
    data = _finite(units, "mis", "sparsity")
    if data.empty or "layer" not in data:
        return None
    layers = list(dict.fromkeys(data["layer"]))
    kinds = sorted(data["kind"].unique()) if "kind" in data else [None]
    ncols = min(max_cols, len(layers))
    blocks = -(-len(layers) // ncols)
    fig, axes = _figure(blocks * len(kinds), ncols, size=(3.3, 2.7), sharey=True)
    colors = series_colors(data["series"])
    order = sorted(s for s in colors if s != BASE_METHOD)
    keys = ["model_id", "series", "sparsity", "layer"] + (["kind"] if kinds != [None] else [])
    per = data.groupby(keys, dropna=False)["mis"].agg(["mean", "sem", "size"]).reset_index()
    per["sem"] = per["sem"].fillna(0.0)
    for k, kind in enumerate(kinds):
        for i, layer in enumerate(layers):
            ax = axes[k * blocks + i // ncols][i % ncols]
            rows = per[(per["layer"] == layer) & ((per["kind"] == kind) if kind else True)]
            if rows.empty:      # e.g. no unit of this layer among the visualized ones
                ax.text(0.5, 0.5, f"no {kind} units\nin this layer" if kind else "no units", ha="center",
                        va="center", transform=ax.transAxes, fontsize=8, color="0.4")
            base = rows[rows["series"] == BASE_METHOD]
            if len(base):
                ax.errorbar(base["sparsity"], base["mean"], yerr=base["sem"], color="black", marker="o", ms=3,
                            capsize=2, ls="none", zorder=5, label="base")
            for s, curve in _curves(rows):
                x = dodge(curve, order.index(s) if s in order else 0, len(order))
                ax.errorbar(x, curve["mean"], yerr=curve["sem"], color=colors[s], marker="o", ms=3, capsize=2,
                            ls=_joined(curve), label=s)
            _chance(ax, label=False)
            ax.set_title(f"{layer} · {kind}" if kind else layer, fontsize=9)
            ax.set_xlabel("sparsity", fontsize=8)
            ax.grid(alpha=0.3)
        for j in range(len(layers), blocks * ncols):
            axes[k * blocks + j // ncols][j % ncols].set_visible(False)
        for b in range(blocks):
            axes[k * blocks + b][0].set_ylabel(f"MIS, {kind} (mean ± SEM)" if kind else "MIS (mean ± SEM)",
                                               fontsize=8)
    _legend_outside(axes[0][-1], fontsize=7)
    return _save(fig, path)


def mis_vs_human(per_unit: pd.DataFrame, path) -> Path | None:
    """Each unit's MIS against its human accuracy (one point per model × unit × kind), identity line."""
    data = _finite(per_unit, "mis", "accuracy")
    if data.empty:
        return None
    fig, axes = _figure(size=(4.6, 4.4))
    ax = axes[0][0]
    colors = series_colors(data.get("series", pd.Series([BASE_METHOD] * len(data))))
    markers = {"natural": "o", "synthetic": "^"}
    for (s, kind), g in data.groupby([data.get("series", pd.Series(BASE_METHOD, index=data.index)), "kind"]):
        ax.scatter(g["mis"], g["accuracy"], s=18, alpha=0.75, color=colors.get(s, "0.3"),
                   marker=markers.get(kind, "s"), label=f"{s} · {kind}")
    ax.plot([0, 1], [0, 1], color="0.3", lw=1, label="identity")
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.axvline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="MIS (machine)", ylabel="human accuracy",
           title="per unit: MIS vs human accuracy", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def interpretable_vs_sparsity(dissection: pd.DataFrame, path) -> Path | None:
    """Network Dissection vs sparsity, per series: interpretable units, their share of the live units (pruning
    removes units, so the count alone mixes fewer units with fewer interpretable ones), unique concepts."""
    data = _finite(dissection, "interpretable", "sparsity")
    if data.empty:
        return None
    panels = [("interpretable", "interpretable units", "interpretable units (IoU > threshold)"),
              ("interpretable_fraction_alive", "share of live units", "interpretable share of live units"),
              ("unique_concepts", "unique concepts", "unique concepts")]
    panels = [p for p in panels if p[0] in data and data[p[0]].notna().any()]
    fig, axes = _figure(1, len(panels))
    colors = series_colors(data["series"])
    order = sorted(s for s in colors if s != BASE_METHOD)
    for ax, (col, _, _) in zip(axes[0], panels):
        _mark_base(ax, data[data[col].notna()], col)
    for s, rows in _curves(data):
        for ax, (col, _, _) in zip(axes[0], panels):
            shown = rows[rows[col].notna()]
            ax.plot(dodge(shown, order.index(s) if s in order else 0, len(order)), shown[col], marker="o",
                    color=colors[s], ls=_joined(shown), label=s)
    for ax, (_, ylabel, title) in zip(axes[0], panels):
        ax.set(xlabel="sparsity (measured)", ylabel=ylabel, title=title, xlim=(-0.03, 1.0))
        ax.set_ylim(bottom=0.0)         # counts and shares from zero, so a drop reads at its size
        ax.grid(alpha=0.3)
    _legend_outside(axes[0][-1])
    return _save(fig, path)


def _robust_series(table: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Add ``series``/``rate`` from the model table (robustness tables leave the base's method empty)."""
    table = table.copy()
    table["model_id"] = table["model_id"].astype(str)
    if models is not None and len(models):
        meta = models.set_index("model_id")
        table["series"] = table["model_id"].map(meta["series"])
        table["rate"] = table["model_id"].map(meta["rate"])
    else:
        table["series"] = table["method"].fillna(BASE_METHOD).replace("", BASE_METHOD)
        table["rate"] = table["rate_requested"].fillna(0.0)
    return table.dropna(subset=["series"])


def _images_per_point(accuracy: pd.DataFrame | None) -> int | None:
    """Images behind one robustness point (the study's fixed subset), from the accuracy table."""
    if accuracy is None or "n_images" not in accuracy or accuracy["n_images"].dropna().empty:
        return None
    return int(accuracy["n_images"].dropna().min())


def _wilson_band(ax, curve: pd.Series, images: int | None, color) -> None:
    """A light 95 % Wilson band of proportions ``curve`` (index: x) over ``images`` images each."""
    if not images:
        return
    lo, hi = wilson_interval(curve.to_numpy(float) * images, images)
    ax.fill_between(curve.index.to_numpy(float), lo, hi, color=color, alpha=0.12, lw=0)


def robustness_curves(robustness: dict, models: pd.DataFrame, path, max_cols: int = 4) -> Path | None:
    """One column per series: top-1 under corruption (mean over the corruptions the base is above chance
    on) vs severity, and noise similarity (top-1 agreement with the parent) vs ε; one line per pruning
    rate, the base in black, each with a 95 % Wilson band over the subset's images (for the mean over
    corruptions the band of one corruption's images: the corruptions see the same images, so it is no
    narrower). Panels of one measure share their y range, so methods compare at a glance."""
    acc = robustness.get("accuracy")
    at_chance = base_at_chance(acc)   # a corruption the base is at chance on would only add noise to the mean
    if at_chance:
        acc = acc[~acc["distribution"].astype(str).isin(at_chance)]
    noise = robustness.get("noise_similarity")
    rows = [(name, _robust_series(t, models)) for name, t in (("accuracy", acc), ("noise", noise))
            if t is not None and len(t)]
    if not rows:
        return None
    images = _images_per_point(robustness.get("accuracy"))
    series = sorted({s for _, t in rows for s in t["series"] if s != BASE_METHOD}) or [BASE_METHOD]
    ncols = min(max_cols, len(series))
    blocks = -(-len(series) // ncols)
    fig, axes = _figure(len(rows) * blocks, ncols, size=(3.8, 3.1), squeeze_unused=len(series))
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    panels = {name: [] for name, _ in rows}
    for r, (name, table) in enumerate(rows):
        rates = sorted(x for x in table["rate"].dropna().unique() if x > 0)
        shade = {rate: cmap(0.1 + 0.8 * i / max(len(rates) - 1, 1)) for i, rate in enumerate(rates)}
        for i, s in enumerate(series):
            ax = axes[(i // ncols) * len(rows) + r][i % ncols]
            panels[name].append(ax)
            for mid, g in table[(table["series"] == s) | (table["series"] == BASE_METHOD)].groupby("model_id"):
                is_base = g["series"].iloc[0] == BASE_METHOD
                if name == "noise" and is_base:
                    continue
                control = not is_base and g["rate"].iloc[0] == 0
                color = "black" if is_base else shade.get(g["rate"].iloc[0], "0.5")
                label = "base" if is_base else "retrained control" if control else f"rate {g['rate'].iloc[0]:.2f}"
                if name == "accuracy":
                    curve = g.groupby("severity")["top1"].mean()
                    ax.plot(curve.index, curve.values, marker="o", ms=3, color=color, ls="--" if is_base else "-",
                            label=label)
                    ax.set_xticks(sorted(table["severity"].dropna().unique()))
                else:
                    g = g.sort_values("eps")
                    curve = g.set_index("eps")["agreement"]
                    ax.plot(curve.index, curve.values, marker=".", color=color, label=label)
                _wilson_band(ax, curve, images, color)
            ax.grid(alpha=0.3)
            if name == "accuracy":
                ax.set(title=s, xlabel="corruption severity (0 = clean)", ylabel="top-1 (mean over corruptions)")
            else:
                ax.set(title=s if r == 0 else None, xlabel="noise ε", ylabel="agreement with parent")
            own_rates = table.loc[table["series"] == s, "rate"]
            if i % ncols == ncols - 1 or i == len(series) - 1 or (len(own_rates) and (own_rates == 0).all()):
                ax.legend(fontsize=6)       # and beside a series at rate 0 only, whose line the others lack
    for group in panels.values():
        limits = np.array([ax.get_ylim() for ax in group])
        for ax in group:
            ax.set_ylim(limits[:, 0].min(), limits[:, 1].max())
    return _save(fig, path)
