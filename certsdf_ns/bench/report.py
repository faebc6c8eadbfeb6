"""Markdown tables from a suite's `suite.json`: what the README's Benchmarks section quotes.

`certsdf-bench report --results-dir DIR` rewrites `DIR/<suite>/summary.md` for every suite found
there and prints the tables, so each figure in the README traces back to one results folder.
`certsdf-bench report --compare DIR ...` prints one table of the quality runs of several folders (e.g.
one certsdf run per budget beside one long run of each peer), with the PSNR also over the test views
that every run rendered, and the real-capture runs of those folders as one table per scene (e.g. a
scene re-run for one method into a second folder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from certsdf_ns.bench.results import _finite, plot_quality, plot_real

SUITES = ("speed", "quality", "sigma", "real")


@dataclass
class ReportConfig:
    """Write markdown tables (summary.md) from finished suites' suite.json and print them."""

    results_dir: Path = Path("bench_results")
    """A results root as given to the suites (reads RESULTS_DIR/<suite>/suite.json)."""
    compare: Tuple[Path, ...] = ()
    """Instead: results roots whose quality runs, and real-capture runs per scene, are tabled together."""


def _num(v, fmt: str) -> str:
    return format(v, fmt) if _finite(v) else "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _machine_line(suite: dict) -> str:
    m = suite.get("machine", {})
    cores = m.get("usable_cores") or m.get("logical_cores")
    return (f"Machine: {m.get('cpu_model', '?')}, {cores} usable core(s) of {m.get('logical_cores')}, "
            f"{m.get('ram_gb')} GB RAM, CUDA {'yes' if m.get('cuda') else 'no'}; torch {m.get('torch')}, "
            f"nerfstudio {m.get('nerfstudio')}. Budget {suite.get('budget_s'):g} s of training per run.")  # fmt: skip


def speed_markdown(suite: dict) -> str:
    rows = suite["rows"]
    ttp = next((k for k in rows[0] if k.startswith("time_to_psnr") and not k.endswith("interp_s")), None) if rows else None
    out = []
    for r in rows:
        if r["status"] == "skipped":
            out.append([r["method"], _skip_reason(r["reason"]), "", "", "", "", ""])
            continue
        ratio = r.get("certsdf_over_method_rays_per_sec")
        out.append([r["method"], _num(r["rays_per_sec"], ".0f"), _num(ratio, ".2f"), _num(r["peak_rss_mb"], ".0f"),
                    _num(r.get(ttp), ".0f") if ttp else "–", _num(r["final_psnr"], ".2f"), _num(r["final_ssim"], ".3f")])  # fmt: skip
    thr = ttp[len("time_to_psnr"):-2] if ttp else "?"
    head = ["method", "train rays/s", "certsdf ÷ method (rays/s)", "peak RSS (MB)",
            f"time to PSNR ≥ {thr} dB (s)", "PSNR at budget", "SSIM at budget"]  # fmt: skip
    return _table(head, out)


def quality_markdown(suite: dict) -> str:
    rows = suite["rows"]
    parts = []
    images = [r for r in rows if r["kind"] == "image"]
    if images:
        body = [[r["scene"], r["method"], _num(r["train_time_s"], ".0f"), _num(r["psnr"], ".2f"), _num(r["ssim"], ".3f")]
                for r in images]  # fmt: skip
        parts.append(_table(["scene", "method", "training time (s)", "test PSNR", "test SSIM"], body))
    meshes = [r for r in rows if r["kind"] == "mesh"]
    if meshes:
        body = [[r["scene"], r["method"], _num(r["train_time_s"], ".0f"), _num(r["chamfer_l1"], ".4f"),
                 _num(r["fscore_0.01"], ".3f"), _num(r["fscore_0.02"], ".3f"), _offset(r), _num(r["export_s"], ".1f"),
                 r["status"] if r["status"] == "ok" else f"{r['status']}: {str(r['reason'])[:60]}"] for r in meshes]  # fmt: skip
        head = ["scene", "mesh", "training time (s)", "Chamfer-L1", "F@0.01", "F@0.02", "offset median / mean",
                "export (s)", "status"]  # fmt: skip
        parts.append(_table(head, body))
        parts.append(_chamfer_ratios(meshes))
    skipped = [r for r in rows if r["kind"] == "skipped"]
    if skipped:
        parts.append("\n".join(f"- {r['method']} ({r['scene']}): {_skip_reason(r['reason'])}" for r in skipped))
    return "\n\n".join(p for p in parts if p)


def _offset(row: dict) -> str:
    """Signed offset median / mean (negative: inside the true surface); '–' for older suites without it."""
    median, mean = row.get("offset_median"), row.get("offset_mean")
    if not _finite(median):
        return "–"
    return f"{median:+.4f} / {mean:+.4f}" if _finite(mean) else f"{median:+.4f}"


def _chamfer_ratios(meshes: List[dict]) -> str:
    """certsdf's final Chamfer-L1 over the best peer export at the same (final) checkpoint time."""
    lines = []
    for scene in dict.fromkeys(r["scene"] for r in meshes):
        ok = [r for r in meshes if r["scene"] == scene and r["status"] == "ok" and _finite(r["chamfer_l1"])]
        ours = [r for r in ok if r["method"].startswith("certsdf")]
        peers = [r for r in ok if not r["method"].startswith("certsdf")]
        if not ours or not peers:
            continue
        last = max(ours, key=lambda r: r["train_time_s"])
        best = min(peers, key=lambda r: r["chamfer_l1"])
        lines.append(f"- {scene}: certsdf Chamfer-L1 {last['chamfer_l1']:.4f} at {last['train_time_s']:.0f} s vs best peer "
                     f"export {best['method']} {best['chamfer_l1']:.4f} at {best['train_time_s']:.0f} s: "
                     f"ratio {last['chamfer_l1'] / best['chamfer_l1']:.2f}")  # fmt: skip
    return "\n".join(lines)


def _skip_reason(reason) -> str:
    reason = str(reason)
    return reason if reason.startswith("not runnable") else f"not runnable here: {reason}"


def sigma_markdown(suite: dict) -> str:
    body = []
    for r in suite["rows"]:
        sig = f"{r['sigma_start_voxels']:g} → {r['sigma_voxels']:g} ({r['anneal_steps']} steps)" if r["annealed"] else f"{r['sigma_voxels']:g}"
        body.append([sig, r["status"], str(r["steps"]), _num(r["psnr"], ".2f"), _num(r["chamfer_l1"], ".4f"),
                     _num(r["fscore_0.01"], ".3f"), _offset(r), _num(r["bound_fraction"], ".4f"), _num(r["bound_fraction_strict"], ".4f"),
                     _num(r["max_abs_sdf_voxels"], ".1f"), _num(r["max_distance_bound_voxels"], ".1f")])  # fmt: skip
    head = ["σ (voxels)", "status", "steps", "test PSNR", "Chamfer-L1", "F@0.01", "offset median", "bound holds (±tol)",
            "bound holds (strict)", r"max \|sdf\| (voxels)", "cap σΦ⁻¹(1−ε) (voxels)"]  # fmt: skip
    return _table(head, body)


def real_rows(records: Sequence[dict]) -> List[dict]:
    """Table rows: one per evaluated checkpoint and mesh (a checkpoint without a mesh has one row)."""
    rows: List[dict] = []
    for r in records:
        tr = r.get("training") or {}
        if not r["evaluations"] and not r["meshes"]:
            rows.append({"kind": "run", "scene": r["scene"], "method": r["method"], "status": r["status"], "reason": r["reason"]})
            continue
        meshes = list(r["meshes"])
        evals = {e["step"]: e for e in r["evaluations"]}
        for step in sorted(set(evals) | {m["step"] for m in meshes}):
            e = evals.get(step, {})
            at = [m for m in meshes if m["step"] == step] or [None]
            for m in at:
                rows.append({
                    "kind": "eval", "scene": r["scene"], "method": r["method"], "status": r["status"],
                    "results": r.get("results"),
                    "mesh": m["method"] if m else "", "step": step,
                    "iterations": e.get("iterations", m.get("iterations") if m else None),
                    "train_time_s": e.get("train_time_s", m["train_time_s"] if m else math.nan),
                    "rays_per_sec": tr.get("rays_per_sec", math.nan),
                    "psnr": e.get("psnr", math.nan), "psnr_masked": e.get("psnr_masked", math.nan),
                    "ssim": e.get("ssim", math.nan), "render_s_per_view": e.get("render_s_per_view", math.nan),
                    "n_views": e.get("n_views"),
                    "iou": m.get("iou", math.nan) if m else math.nan, "coverage": m.get("coverage", math.nan) if m else math.nan,
                    "export_s": m.get("export_s", math.nan) if m else math.nan,
                    "mesh_status": (m["status"] if m["status"] == "ok" else f"{m['status']}: {m['reason']}") if m else "",
                    "picture": m.get("picture", "") if m else "",
                })  # fmt: skip
        usable = r.get("first_usable_mesh")
        if usable:
            rows.append({"kind": "usable_mesh", "scene": r["scene"], "method": r["method"], "results": r.get("results"),
                         "metric": usable["metric"],
                         "threshold": usable["threshold"], "reached": usable["reached"], "step": usable.get("step"),
                         "train_time_s": usable.get("train_time_s", math.nan), "minutes": usable.get("minutes", math.nan),
                         "value": usable.get("value", math.nan),
                         "best_value": (usable.get("best") or {}).get("value", math.nan),
                         "best_train_time_s": (usable.get("best") or {}).get("train_time_s", math.nan)})  # fmt: skip
    return rows


def real_markdown(suite: dict) -> str:
    """One table per scene (certsdf-bench real), its first-usable-mesh line, and the definitions."""
    rows = suite["rows"]
    parts = []
    for scene in dict.fromkeys(r["scene"] for r in rows):
        evals = [r for r in rows if r["scene"] == scene and r["kind"] == "eval"]
        masked = any(_finite(r.get("psnr_masked")) or _finite(r.get("iou")) for r in evals)
        # --compare: a method run in several results folders (say, before and after a change) names its folder
        runs_of = {(r["method"], r.get("results")) for r in evals}
        by_folder = len(runs_of) > len({method for method, _ in runs_of})
        head = ["method"] + (["results"] if by_folder else []) + ["mesh", "steps", "training time (s)", "train rays/s", "PSNR"]
        head += ["PSNR masked", "SSIM", "IoU", "coverage"] if masked else ["SSIM"]
        common = [r for r in evals if r.get("psnr_common_views") is not None]
        if common:  # --compare: runs that rendered different held-out views, scored also on the ones they share
            head.append(f"PSNR, views {', '.join(common[0]['common_views'])}")
        head += ["mesh export (s)", "render (s/view)", "status"]
        body = []
        for r in evals:
            line = [r["method"]] + ([str(r.get("results") or "–")] if by_folder else []) + [r["mesh"] or "–", str(r["iterations"]) if r.get("iterations") is not None else "–",
                    _num(r["train_time_s"], ".0f"), _num(r["rays_per_sec"], ".0f"), _num(r["psnr"], ".2f")]  # fmt: skip
            line += ([_num(r["psnr_masked"], ".2f"), _num(r["ssim"], ".3f"), _num(r["iou"], ".3f"), _num(r["coverage"], ".3f")]
                     if masked else [_num(r["ssim"], ".3f")])  # fmt: skip
            if common:
                line.append(_num(r.get("psnr_common_views"), ".2f"))
            status = r["status"] if r["status"] == "ok" else f"{r['status']}"
            if r.get("mesh_status") and r["mesh_status"] != "ok":
                status = f"mesh {str(r['mesh_status'])[:60]}"
            line += [_num(r["export_s"], ".1f"), _num(r["render_s_per_view"], ".2f"), status]
            body.append(line)
        lines = [f"#### {scene}", _table(head, body) if body else "(no evaluated checkpoint)"]
        for r in rows:
            if r["scene"] != scene:
                continue
            if r["kind"] == "run":
                lines.append(f"- {r['method']}: {r['status']}: {str(r['reason'])[:200]}")
            elif r["kind"] == "usable_mesh":
                what = f"{r['metric']} ≥ {r['threshold']:g}" + (f", {r.get('results')}" if by_folder else "")
                if r["reached"]:
                    lines.append(f"- minutes to the first usable certsdf mesh ({what}): {r['minutes']:.1f} min "
                                 f"(step {r['step']}, {r['metric']} {r['value']:.3f})")  # fmt: skip
                else:
                    best = f"; best {r['best_value']:.3f} at {r['best_train_time_s']:.0f} s" if _finite(r.get("best_value")) else ""
                    lines.append(f"- minutes to the first usable certsdf mesh ({what}): not reached in the budget{best}")
        parts.append("\n\n".join(lines))
    defs = suite.get("definitions") or {}
    if defs:
        parts.append("\n".join(f"- {k}: {v}" for k, v in defs.items()))
    return "\n\n".join(parts)


RENDERERS: Dict[str, Callable[[dict], str]] = {"speed": speed_markdown, "quality": quality_markdown, "sigma": sigma_markdown,
                                               "real": real_markdown}  # fmt: skip


def write_summary(suite_dir: Path) -> str:
    """`suite_dir/summary.md` from `suite_dir/suite.json` (the folder is named after its suite)."""
    suite = json.loads((suite_dir / "suite.json").read_text())
    md = f"### {suite_dir.name}\n\n{_machine_line(suite)}\n\n{RENDERERS[suite_dir.name](suite)}\n"
    (suite_dir / "summary.md").write_text(md, encoding="utf-8")
    return md


def write_report(results_dir: Path) -> Dict[str, str]:
    """summary.md for every suite under results_dir, quality plots redrawn; returns {suite: markdown}."""
    written = {}
    for name in SUITES:
        suite_dir = Path(results_dir) / name
        if not (suite_dir / "suite.json").is_file():
            continue
        if name in ("quality", "real"):  # their plots come from the per-run records, which suite.json does not hold
            runs = [json.loads(p.read_text()) for p in sorted(suite_dir.glob("*.json")) if p.name != "suite.json"]
            (plot_quality if name == "quality" else plot_real)(suite_dir, [r for r in runs if "evaluations" in r])
        written[name] = write_summary(suite_dir)
    return written


def compare_markdown(results_dirs: Sequence[Path]) -> str:
    """One row per evaluated checkpoint of every quality run under the folders, in budget and time order:
    steps, PSNR/SSIM over the run's test views and over the first k views that every run rendered (k the
    fewest), render time, train rays/s, peak RSS, mean load, and whether the method ran its own budget."""
    runs = []
    for folder in results_dirs:
        runs += [json.loads(p.read_text()) for p in sorted((Path(folder) / "quality").glob("*.json")) if p.name != "suite.json"]
    runs = [r for r in runs if r.get("evaluations")]
    if not runs:
        raise ValueError(f"no evaluated quality run under {', '.join(str(d) for d in results_dirs)}")
    common = min(len(e.get("psnr_per_view") or []) for r in runs for e in r["evaluations"])
    body = []
    for r in sorted(runs, key=lambda r: (r["budget_s"], r["method"])):
        tr = r["training"]
        steps = {c["step"]: c["iterations"] for c in tr.get("checkpoints", [])}
        for e in r["evaluations"]:
            first = (e.get("psnr_per_view") or [])[:common]
            body.append([r["method"], f"{r['budget_s'] / 60:g} min" + (" (own)" if r.get("own_budget") else ""),
                         _num(e["train_time_s"] / 60, ".1f"), str(steps.get(e["step"], "–")), _num(e["psnr"], ".2f"),
                         _num(e["ssim"], ".3f"), str(e["n_views"]), _num(sum(first) / len(first), ".2f") if first else "–",
                         _num(e["render_s"] / e["n_views"], ".1f"), _num(tr.get("rays_per_sec"), ".0f"),
                         _num(tr.get("peak_rss_mb", float("nan")) / 1024, ".2f"), _num(tr.get("mean_load_1m"), ".2f")])  # fmt: skip
    head = ["method", "budget", "evaluated at (min)", "steps", "PSNR", "SSIM", "views", f"PSNR, first {common} views",
            "render s / view", "train rays/s", "peak RSS (GB)", "mean load"]  # fmt: skip
    return _table(head, body)


def compare_real_markdown(results_dirs: Sequence[Path]) -> Optional[str]:
    """The real-capture runs under the folders as real_markdown's tables, one per scene, with a column of
    PSNR over the held-out views that every run of the scene rendered (None when there is no real run)."""
    runs = []
    for folder in results_dirs:
        for path in sorted((Path(folder) / "real").glob("*.json")):
            record = json.loads(path.read_text())
            if path.name != "suite.json" and "evaluations" in record:
                runs.append({**record, "results": Path(folder).name})
    if not runs:
        return None
    rows = real_rows(runs)
    for scene in dict.fromkeys(r["scene"] for r in runs):
        evals = [e for r in runs if r["scene"] == scene for e in r["evaluations"]]
        names = [set(v["view"] for v in e.get("views", [])) for e in evals]
        shared = sorted(set.intersection(*names), key=lambda v: (len(v), v)) if names else []
        if not shared or all(len(n) == len(shared) for n in names):
            continue  # every run rendered the same views: the PSNR column says it already
        by_run_step = {(r["results"], r["method"], e["step"]): e for r in runs if r["scene"] == scene for e in r["evaluations"]}
        for row in rows:
            key = (row.get("results"), row.get("method"), row.get("step"))
            e = by_run_step.get(key) if row["scene"] == scene and row["kind"] == "eval" else None
            if e is not None:
                vals = [v["psnr"] for v in e["views"] if v["view"] in shared]
                row["psnr_common_views"], row["common_views"] = sum(vals) / len(vals), shared
    return real_markdown({"rows": rows, "definitions": runs[0].get("definitions") or {}})


def run_report(cfg: ReportConfig) -> Optional[List[str]]:
    from nerfstudio.utils.rich_utils import CONSOLE

    if cfg.compare:
        real = compare_real_markdown(cfg.compare)
        try:
            print(compare_markdown(cfg.compare))
        except ValueError as exc:
            if real is None:
                CONSOLE.print(f"certsdf-bench report: {exc} (nor a real-capture run under */real)", markup=False)
                raise SystemExit(2)
        if real is not None:
            print(real)
        return None
    written = write_report(cfg.results_dir)
    if not written:
        CONSOLE.print(f"certsdf-bench report: no suite.json under {cfg.results_dir}/{{{','.join(SUITES)}}}", markup=False)
        raise SystemExit(2)
    for md in written.values():
        print(md)
    return list(written)
