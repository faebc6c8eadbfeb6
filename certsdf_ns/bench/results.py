"""Results on disk: one JSON per run, a summary.csv per suite, PNG plots, and the machine.

Layout: `RESULTS_DIR/<suite>/<run>.json`, `RESULTS_DIR/<suite>/summary.csv`,
`RESULTS_DIR/<suite>/*.png`; training outputs live under `RESULTS_DIR/<suite>/runs/`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import psutil
import torch


def machine_info() -> dict:
    """Cores, RAM, CPU model, GPU and library versions: timings mean nothing without them."""
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu_model": cpu_model,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "nerfstudio": version("nerfstudio"),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2))
    return path


def write_csv(path: Path, rows: Sequence[Mapping]) -> Path:
    """Rows may have different keys; the header is their union in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header: List[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()})
    return path


Series = Dict[str, List[Tuple[float, float]]]


def plot_lines(path: Path, series: Series, title: str, xlabel: str, ylabel: str, logx: bool = True,
               notes: Optional[Iterable[str]] = None, xticks: Optional[Sequence[float]] = None,
               logy: bool = False) -> Path:  # fmt: skip
    """One line per key of `series` ([(x, y), ...]); methods with no finite point are listed in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, points in series.items():
        pts = sorted((x, y) for x, y in points if _finite(x) and _finite(y))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        else:
            ax.plot([], [], label=f"{label} (no data)")
    xs = [x for pts in series.values() for x, y in pts if _finite(x) and x > 0 and _finite(y)]
    # A log axis over less than a decade shows no labelled tick at all: stay linear then.
    if logx and xs and max(xs) >= 10 * min(xs):
        _log_time_axis(ax)
    if logy and any(_finite(y) and y > 0 for pts in series.values() for _, y in pts):
        ax.set_yscale("log")
    if xticks:
        ax.set_xticks(list(xticks), [f"{x:g}" for x in xticks])
        ax.xaxis.set_minor_formatter(_null_formatter())
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, va="bottom")
        fig.subplots_adjust(bottom=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_time_axis(ax) -> None:
    """Log x-axis with plain numbers (1, 2, 5, 10, 20, 50, ...) instead of 2×10⁰ labels."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    # Minor ticks sit at 2..9 × 10^k: label only 2 and 5 to keep the axis readable.
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "25" else ""))


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def plot_bars(path: Path, values: Mapping[str, float], title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    labels = list(values)
    heights = [values[k] if _finite(values[k]) else 0.0 for k in labels]
    bars = ax.bar(labels, heights)
    for bar, key in zip(bars, labels):
        text = f"{values[key]:.3g}" if _finite(values[key]) else "n/a"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_quality(out: Path, records: Sequence[dict]) -> None:
    """Per scene: PSNR/SSIM vs time, and Chamfer-L1/F-score vs time where meshes were scored.

    Takes the per-run records (as written to `<run>.json`), so `certsdf-bench report` can redraw them."""
    for scene in dict.fromkeys(r["scene"] for r in records):
        recs = [r for r in records if r["scene"] == scene and r["status"] != "skipped"]
        notes = [f"{r['method']}: {r['reason']}" for r in records if r["scene"] == scene and r["status"] == "skipped"]
        for key, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
            series = {r["method"]: [(e["train_time_s"], e[key]) for e in r["evaluations"]] for r in recs}
            plot_lines(out / f"{scene}_{key}.png", series, f"{scene}: test {key.upper()} vs training time",
                       "training time (s)", label, notes=notes)  # fmt: skip
        meshes = [m for r in recs for m in r.get("meshes") or []]
        if not meshes:
            continue
        for key, label in (("chamfer_l1", "Chamfer-L1 (scene units)"), ("fscore", "F-score @ 0.01")):
            series: Dict[str, list] = {}
            for m in meshes:
                y = m["chamfer_l1"] if key == "chamfer_l1" else (m.get("fscore") or {}).get("0.01", math.nan)
                series.setdefault(m["method"], []).append((m["train_time_s"], math.nan if y is None else y))
            failed = [f"{m['method']} @ step {m['step']}: {m['status']} ({m['reason'][:80]})" for m in meshes if m["status"] != "ok"]
            # Chamfer spans orders of magnitude between a surface and a floater-ridden export: log scale.
            plot_lines(out / f"{scene}_{key}.png", series, f"{scene}: {label} vs training time",
                       "training time (s)", label, notes=notes + failed[:6], logy=key == "chamfer_l1")  # fmt: skip


def plot_real(out: Path, records: Sequence[dict]) -> None:
    """Per real scene: held-out PSNR vs training time per method, and (where masks exist) each
    mesh's silhouette IoU and coverage vs training time. Takes the per-run records (`<run>.json`)."""
    for scene in dict.fromkeys(r["scene"] for r in records):
        recs = [r for r in records if r["scene"] == scene]
        notes = [f"{r['method']}: {r['status']} ({str(r['reason'])[:80]})" for r in recs if r["status"] != "ok"]
        series = {r["method"]: [(e["train_time_s"], e["psnr"]) for e in r["evaluations"]] for r in recs}
        plot_lines(out / f"{scene}_psnr.png", series, f"{scene}: held-out PSNR vs training time", "training time (s)",
                   "PSNR (dB)", notes=notes)  # fmt: skip
        meshes = [m for r in recs for m in r.get("meshes") or [] if _finite(m.get("iou"))]
        if not meshes:
            continue
        sil: Dict[str, list] = {}
        for m in meshes:
            for key in ("iou", "coverage"):
                sil.setdefault(f"{m['method']} {key}", []).append((m["train_time_s"], m[key]))
        plot_lines(out / f"{scene}_silhouette.png", sil, f"{scene}: mesh silhouette vs object masks (held-out views)",
                   "training time (s)", "IoU / coverage", notes=notes)  # fmt: skip
