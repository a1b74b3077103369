"""The scaling plots of the ViT paper, from a sweep's results table (``vit_jax.scaling.table``).

* ``plot_compute``: accuracy against pre-training compute (Figure 5 / Table 6): one marker per
  model family (ViT circles, hybrids triangles, BiT squares), the Pareto frontier, and the
  saturating power law fitted to that frontier; one panel per metric.
* ``plot_few_shot_vs_data``: linear few-shot accuracy against pre-training examples, one line per
  model (Figure 4).
* ``plot_finetune_vs_data``: fine-tuned accuracy against pre-training examples (Figure 3).
* ``plot_all``: every plot the table supports, a ``summary.md`` with the fits, and a note naming
  the expected runs that are absent or failed (what exists is plotted all the same).

Every figure is written as PNG and SVG. Matplotlib draws on its Agg canvas through ``Figure``
objects, without pyplot, so nothing here touches the process's backend or keeps figures alive.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vit_jax.scaling import fit as fitting
from vit_jax.scaling import table

EXA = 1e18
FAMILY_STYLE = {  # marker, colour, legend label
    "ViT": ("o", "C0", "Transformer (ViT)"),
    "BiT": ("s", "C3", "ResNet (BiT)"),
    "hybrid": ("^", "C1", "Hybrid"),
    "Mixer": ("D", "C2", "Mixer"),
}
OTHER_MARKERS = ("v", "P", "X", "*", "h", "p", "<", ">")
DATASET_NAMES = {
    "imagenet": "ImageNet", "imagenet2012": "ImageNet", "imagenet_real": "ImageNet ReaL",
    "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "pets": "Oxford-IIIT Pets",
    "oxford_iiit_pet": "Oxford-IIIT Pets", "flowers": "Oxford Flowers-102",
    "oxford_flowers102": "Oxford Flowers-102", "vtab": "VTAB", "digits": "Digits",
    "average": "Average", "average5": "Average-5",
}

Row = Mapping[str, Any]


@dataclasses.dataclass
class ComputeCurve:
  """One metric against pre-training compute: its points, Pareto frontier and power-law fit."""

  metric: str
  rows: list[Row]  # the finished runs with the metric and a positive train_flops
  compute: np.ndarray  # exaFLOPs
  error: np.ndarray  # 1 - accuracy
  frontier: np.ndarray  # indices into the above, by compute
  fit: fitting.PowerLawFit | None
  held_out: fitting.HeldOut | None
  note: str  # why there is no fit or no held-out check, or ""
  left_out: int  # finished runs with the metric but without a compute


def compute_curve(rows: Iterable[Row], metric: str, *, fit: bool = True) -> ComputeCurve:
  """The points of ``metric`` against compute (finished runs only), their frontier and fit."""
  with_metric = [row for row in table.done(rows) if table.is_number(row.get(metric))]
  points = [row for row in with_metric
            if table.is_number(row.get("train_flops")) and row["train_flops"] > 0]
  compute = np.array([row["train_flops"] / EXA for row in points], dtype=float)
  error = np.array([1.0 - row[metric] for row in points], dtype=float)
  frontier = fitting.pareto_frontier(compute, error)
  law, held_out, notes = None, None, []
  if fit and len(frontier) < fitting.MIN_POINTS:
    notes.append(f"no power-law fit: {len(frontier)} points on the Pareto frontier, "
                 f"{fitting.MIN_POINTS} needed")
  elif fit:
    name = f"the Pareto frontier of {metric}"
    try:
      law = fitting.fit_saturating_power_law(compute[frontier], error[frontier], name=name)
    except ValueError as error_:
      notes.append(f"no power-law fit: {error_}")
    if law is not None:
      try:
        held_out = fitting.held_out_error(compute[frontier], error[frontier], name=name)
      except ValueError as error_:
        notes.append(f"no held-out check: {error_}")
  return ComputeCurve(metric, points, compute, error, frontier, law, held_out, "; ".join(notes),
                      len(with_metric) - len(points))


def plot_compute(rows: Iterable[Row], metric: str | Sequence[str], path: str | os.PathLike, *,
                 fit: bool = True, as_error: bool = False, note: str = "") -> list[Path]:
  """Accuracy (or, ``as_error``, error on a log axis) against pre-training exaFLOPs.

  One panel per metric; markers by family, the Pareto frontier and, with ``fit``, the saturating
  power law fitted to the frontier (parameters in the legend, C in exaFLOPs). ``note`` goes under
  the figure. Returns the PNG and SVG paths.
  """
  rows = list(rows)
  metrics = [metric] if isinstance(metric, str) else list(metric)
  fig, axes = _figure(len(metrics))
  for ax, name in zip(axes, metrics):
    curve = compute_curve(rows, name, fit=fit)
    _compute_panel(ax, curve, as_error)
  fig.suptitle("Performance versus pre-training compute", fontsize=11)
  return _save(fig, path, note)


def plot_few_shot_vs_data(rows: Iterable[Row], path: str | os.PathLike, *,
                          note: str = "") -> list[Path]:
  """Linear few-shot accuracy against pre-training examples, one line per model (Figure 4)."""
  rows = table.done(rows)
  metrics = table.metric_columns(rows, "fewshot/")
  if not metrics:
    raise ValueError("the results table has no finished few-shot run (no fewshot/* column)")
  return _plot_vs_data(rows, metrics, path, "Linear few-shot evaluation versus pre-training size",
                       note)


def plot_finetune_vs_data(rows: Iterable[Row], path: str | os.PathLike, *,
                          note: str = "") -> list[Path]:
  """Fine-tuned accuracy against pre-training examples, one line per model (Figure 3)."""
  rows = table.done(rows)
  metrics = table.metric_columns(rows, "transfer/")
  if not metrics:
    raise ValueError("the results table has no finished fine-tuning run (no transfer/* column)")
  return _plot_vs_data(rows, metrics, path, "Transfer accuracy versus pre-training dataset size",
                       note)


def plot_all(rows: Iterable[Row], directory: str | os.PathLike,
             expected_runs: Sequence[str] | None = None) -> list[Path]:
  """Every plot the table supports, under ``directory``, and ``summary.md``; returns the paths.

  Runs that are expected but absent, or in the table but not done, are named in a note: printed,
  written under each figure and into the summary. The plots show whatever finished.
  """
  rows = list(rows)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  reasons = table.missing_reasons(expected_runs or [], rows)
  for row in rows:  # failed runs nobody listed are missing too
    if row.get("status") != table.DONE:
      reasons.setdefault(row.get("run", "?"), row.get("status") or "no status")
  note = missing_note(reasons)

  finished = table.done(rows)
  transfer = table.metric_columns(finished, "transfer/")
  fewshot = table.metric_columns(finished, "fewshot/")
  upstream = [m for m in table.metric_columns(finished, "eval/") if m.endswith("top1")]
  written: list[Path] = []
  summary = ["# Scaling results", "", f"{len(finished)} finished runs of {len(rows)} in the table."]
  skipped = []

  for name, metrics in (("compute_transfer", transfer), ("compute_fewshot", fewshot),
                        ("compute_upstream", upstream)):
    curves = [compute_curve(finished, metric) for metric in metrics]
    if not any(len(curve.compute) for curve in curves):
      if metrics:
        skipped.append(f"{name}: no finished run with both {', '.join(metrics)} and train_flops")
      continue
    written += plot_compute(finished, metrics, directory / name, note=note)
    summary += ["", f"## {name}", ""] + [line for curve in curves for line in _fit_lines(curve)]

  for name, metrics, plot, stage in (
      ("fewshot_vs_data", fewshot, plot_few_shot_vs_data, "few-shot"),
      ("finetune_vs_data", transfer, plot_finetune_vs_data, "fine-tuning")):
    if not metrics:
      continue
    sizes = {row.get("data_size") for row in finished
             if table.is_number(row.get("data_size"))
             and any(table.is_number(row.get(m)) for m in metrics)}
    if len(sizes) < 2:
      skipped.append(f"{name}: {stage} results from {len(sizes)} pre-training data size"
                     f"{'s' if len(sizes) != 1 else ''}; a curve needs at least 2")
      continue
    written += plot(finished, directory / name, note=note)

  if not written:
    skipped.append("everything: no finished run has a metric to plot")
  if skipped:
    summary += ["", "## Not plotted", ""] + [f"* {line}" for line in skipped]
  if reasons:
    summary += ["", "## Missing runs", ""] + [f"* {run}: {why}" for run, why in reasons.items()]
  summary_path = directory / "summary.md"
  summary_path.write_text("\n".join(summary) + "\n")
  written.append(summary_path)

  for line in ([note] if note else []) + [f"not plotted: {line}" for line in skipped]:
    print(line)
  return written


def missing_note(reasons: Mapping[str, str], limit: int = 12) -> str:
  """"Missing N runs: a (absent), b (failed), ..." for run -> reason, or "" when none."""
  if not reasons:
    return ""
  items = [f"{run} ({why})" for run, why in reasons.items()]
  more = f", and {len(items) - limit} more" if len(items) > limit else ""
  return (f"Missing {len(items)} run{'s' if len(items) != 1 else ''}: "
          + ", ".join(items[:limit]) + more)


def _fit_lines(curve: ComputeCurve) -> list[str]:
  lines = [f"* `{curve.metric}`: {len(curve.compute)} runs, {len(curve.frontier)} on the Pareto "
           f"frontier" + (f" ({curve.left_out} without train_flops left out)"
                          if curve.left_out else "")]
  if curve.fit is not None:
    law = curve.fit
    lines.append(f"  * E = {law.a:.4g}·(C + {law.d:.4g})^(−{law.b:.4g}) + {law.c:.4g} "
                 f"(C in exaFLOPs, E = 1 − accuracy; log-error RMS {law.rms:.3g})")
  if curve.held_out is not None:
    held = curve.held_out
    lines.append(f"  * held out the largest compute ({held.compute:.4g} exaFLOPs): predicted error "
                 f"{held.predicted:.4g}, measured {held.observed:.4g} "
                 f"({held.relative_error:+.1%})")
  if curve.note:
    lines.append(f"  * {curve.note}")
  return lines


def _compute_panel(ax: Any, curve: ComputeCurve, as_error: bool) -> None:
  def y(error: np.ndarray) -> np.ndarray:
    return 100 * (error if as_error else 1 - error)

  title, ylabel = _describe(curve.metric)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("Total pre-training compute [exaFLOPs]")
  ax.set_ylabel(f"{title} error [%]" if as_error else ylabel)
  ax.set_xscale("log")
  if as_error:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(True, which="major", alpha=0.4)
  ax.grid(True, which="minor", alpha=0.15)
  if not len(curve.compute):
    ax.text(0.5, 0.5, f"no finished run with {curve.metric}\nand a train_flops",
            ha="center", va="center", transform=ax.transAxes, color="0.4")
    return

  families = [str(row.get("family") or "unknown") for row in curve.rows]
  for family in _family_order(families):
    marker, colour, label = _family_style(family, families)
    chosen = np.array([f == family for f in families])
    ax.scatter(curve.compute[chosen], y(curve.error[chosen]), marker=marker, s=36,
               facecolor=colour, edgecolor="black", linewidth=0.5, alpha=0.9, label=label,
               zorder=3)
  front = curve.frontier
  ax.plot(curve.compute[front], y(curve.error[front]), color="black", linestyle="--",
          linewidth=1, label="Pareto frontier", zorder=2)
  if curve.fit is not None:
    grid = np.geomspace(curve.compute.min(), curve.compute.max() * 3, 200)
    ax.plot(grid, y(curve.fit.predict(grid)), color="0.45", linewidth=1.5,
            label="power law " + curve.fit.label(), zorder=1)
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
  if curve.note:
    # Accuracy grows with compute: the lower right corner is empty (the upper right for error).
    ax.text(0.98, 0.98 if as_error else 0.02, textwrap.fill(curve.note, 50), fontsize=6,
            color="0.35", transform=ax.transAxes, ha="right", va="top" if as_error else "bottom")


def _plot_vs_data(rows: list[Row], metrics: list[str], path: str | os.PathLike, title: str,
                  note: str) -> list[Path]:
  models = _model_order(rows)
  colours = {model: f"C{i % 10}" for i, model in enumerate(models)}
  families = [str(row.get("family") or "unknown") for row in rows]
  fig, axes = _figure(len(metrics), legend_width=0.0)
  handles: dict[str, Line2D] = {}
  for ax, metric in zip(axes, metrics):
    panel_title, ylabel = _describe(metric)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("Pre-training examples")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    by_model: dict[str, dict[int, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    family_of = {}
    for row in rows:
      if table.is_number(row.get(metric)) and table.is_number(row.get("data_size")):
        model = str(row.get("model") or row.get("run"))
        by_model[model][row["data_size"]].append(100 * row[metric])
        family_of[model] = str(row.get("family") or "unknown")
    for model in models:
      if model not in by_model:
        continue
      sizes = sorted(by_model[model])
      mean = [np.mean(by_model[model][size]) for size in sizes]
      marker, _, _ = _family_style(family_of[model], families)
      (line,) = ax.plot(sizes, mean, marker=marker, color=colours[model], markersize=6,
                        markeredgecolor="black", markeredgewidth=0.5, linewidth=1.5, label=model)
      spread = [(min(v), max(v)) for v in (by_model[model][size] for size in sizes)]
      if any(lo != hi for lo, hi in spread):  # several seeds: their range
        ax.fill_between(sizes, [lo for lo, _ in spread], [hi for _, hi in spread],
                        color=colours[model], alpha=0.15, linewidth=0)
      handles.setdefault(model, line)
  fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
             frameon=False, title="Model", title_fontsize=8)
  fig.suptitle(title, fontsize=11)
  return _save(fig, path, note)


def _figure(panels: int, legend_width: float = 2.0) -> tuple[Figure, list[Any]]:
  panels = max(panels, 1)
  fig = Figure(figsize=(panels * (4.0 + legend_width) + 1.5, 3.6), layout="constrained")
  axes = fig.subplots(1, panels, squeeze=False)[0]
  return fig, list(axes)


def _save(fig: Figure, path: str | os.PathLike, note: str) -> list[Path]:
  if note:
    fig.supxlabel(textwrap.fill(note, 140), fontsize=7, color="firebrick", x=0.01, ha="left")
  base = Path(path)
  if base.suffix.lower() in (".png", ".svg"):
    base = base.with_suffix("")
  base.parent.mkdir(parents=True, exist_ok=True)
  paths = [base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")]
  fig.savefig(paths[0], dpi=150, bbox_inches="tight")
  fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
  return paths


def _describe(metric: str) -> tuple[str, str]:
  """(panel title, y label) of a metric column."""
  parts = metric.split("/")
  if metric.startswith("eval/"):
    return "Upstream (pre-training) evaluation", "Upstream top-1 accuracy [%]"
  if parts[0] == "transfer" and len(parts) >= 2:
    dataset = _dataset(parts[1])
    return f"{dataset} transfer", f"{dataset} fine-tuned top-1 accuracy [%]"
  if parts[0] == "fewshot" and len(parts) >= 3:
    dataset = _dataset(parts[1])
    shots = re.fullmatch(r"(\d+)shot", parts[2])
    k = f"{shots.group(1)}-shot" if shots else parts[2]
    return f"{dataset} linear {k}", f"Linear {k} {dataset} top-1 accuracy [%]"
  return metric, f"{metric} [%]"


def _dataset(name: str) -> str:
  return DATASET_NAMES.get(name.lower(), name)


def _family_order(families: Iterable[str]) -> list[str]:
  present = set(families)
  return [f for f in FAMILY_STYLE if f in present] + sorted(present - set(FAMILY_STYLE))


def _family_style(family: str, all_families: Iterable[str]) -> tuple[str, str, str]:
  if family in FAMILY_STYLE:
    return FAMILY_STYLE[family]
  others = [f for f in _family_order(all_families) if f not in FAMILY_STYLE]
  i = others.index(family) if family in others else 0
  return OTHER_MARKERS[i % len(OTHER_MARKERS)], f"C{(4 + i) % 10}", family


def _model_order(rows: Iterable[Row]) -> list[str]:
  """Models by family (ViT, BiT, hybrid, then others), then by parameter count, then name."""
  info: dict[str, tuple[int, float, str]] = {}
  rank = {family: i for i, family in enumerate(FAMILY_STYLE)}
  for row in rows:
    model = str(row.get("model") or row.get("run"))
    params = row.get("params") if table.is_number(row.get("params")) else float("inf")
    info[model] = (rank.get(str(row.get("family")), len(rank)), params, model)
  return sorted(info, key=lambda model: info[model])
