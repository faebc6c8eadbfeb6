"""The suites on Blender scenes: speed, quality and sigma (real captures: :mod:`certsdf_ns.bench.real`).

Each writes `<results>/<suite>/` (see `results`)."""

from __future__ import annotations

import math
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.bench.data import SceneOptions, resolve_scene
from certsdf_ns.bench.meshes import PeerExportOptions
from certsdf_ns.bench.methods import get_method
from certsdf_ns.bench.offline import CHECKPOINT_NOTE, LPIPS_NOTE
from certsdf_ns.bench.report import write_summary
from certsdf_ns.bench.results import machine_info, plot_bars, plot_lines, plot_quality, write_csv, write_json
from certsdf_ns.bench.runner import trial_run_dir
from certsdf_ns.bench.trial import TrialOptions, TrialRequest, run_trial
from certsdf_ns.output_paths import OutputLocationError
from certsdf_ns.training.run_folder import existing_run_message

ALL_METHODS = ("certsdf", "nerfacto", "tensorf", "instant-ngp", "neus", "neus-facto")


@dataclass
class BenchConfig:
    """Options shared by every suite."""

    results_dir: Path = Path("bench_results")
    """Results root; the suite writes into RESULTS_DIR/<suite>/."""
    trial: TrialOptions = field(default_factory=TrialOptions)
    """Training, checkpoint and evaluation options of every trial."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training/evaluation device; 'auto' is CUDA when available."""

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


@dataclass
class SuiteConfig(BenchConfig):
    """Options shared by the suites on Blender-format scenes (speed, quality, sigma)."""

    scenes: SceneOptions = field(default_factory=SceneOptions)
    """Where scenes come from."""


@dataclass
class SpeedConfig(SuiteConfig):
    """certsdf vs its peers on one scene: rays/s, peak RSS, time to a test PSNR."""

    scene: str = "lego"
    """Scene name or Blender folder (see certsdf_ns.bench.data)."""
    methods: Tuple[str, ...] = ALL_METHODS
    """Methods; those needing CUDA are listed as not runnable on CPU machines."""
    budget_s: float = 300.0
    """Training seconds per method."""
    psnr_threshold: float = 20.0
    """Report the training time to the first evaluated checkpoint with test PSNR ≥ this."""


@dataclass
class QualityConfig(SuiteConfig):
    """PSNR/SSIM (and Chamfer/F-score on mesh scenes) against training time."""

    scene_names: Tuple[str, ...] = ("lego", "bunny", "cow")
    """Scenes: 'lego', mesh names in --scenes.meshes-dir, 'demo', or Blender folders."""
    methods: Tuple[str, ...] = ALL_METHODS
    """Methods; those needing CUDA are listed as not runnable on CPU machines."""
    budget_s: float = 600.0
    """Training seconds per method and scene."""
    peer_exports: bool = True
    """Extract peer meshes with ns-export tsdf/poisson on mesh scenes."""
    export: PeerExportOptions = field(default_factory=PeerExportOptions)
    """ns-export settings of the peer meshes."""
    export_points: int = 3
    """Checkpoints (log-spaced, last included) at which peers are exported."""


@dataclass
class CertifyOptions:
    """The certificate check (see certsdf_ns.bench.certify)."""

    n_points: int = 20_000
    """Query points (half uniform in the box, half near the smoothed surface)."""
    surface_samples: int = 1_000_000
    """Samples of the smoothed surface {p̂ = ½} for the KD-tree."""
    tolerance_voxels: float = 0.1
    """|sdf| ≤ distance + tolerance counts as holding (reference discretisation error)."""


@dataclass
class SigmaConfig(SuiteConfig):
    """certsdf's smoothing σ swept at a fixed training time, plus an annealed schedule."""

    scene: str = "bunny"
    """Scene name or Blender folder (see certsdf_ns.bench.data)."""
    sigmas: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """Fixed σ values in voxels (sigma_start_voxels = sigma_voxels)."""
    anneal: Optional[Tuple[float, float]] = (4.0, 1.0)
    """Annealed row: σ from the first to the second value (voxels); None to skip."""
    anneal_steps: int = 0
    """Steps of the annealed schedule; 0: anneal_fraction of the median steps the fixed-σ runs reached."""
    anneal_fraction: float = 0.5
    """With anneal_steps = 0: the fraction of the budget's steps spent annealing."""
    budget_s: float = 300.0
    """Training seconds per σ."""
    certify: CertifyOptions = field(default_factory=CertifyOptions)
    """The certificate check of each run's last checkpoint."""


# --------------------------------------------------------------------------- running


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), console=CONSOLE, transient=False)  # fmt: skip


def refuse_earlier_trials(out: Path, requests: Sequence[TrialRequest]) -> None:
    """Before any trial: runs are never overwritten (ns-train certsdf would refuse the folder
    mid-suite, after hours of other trials), so a results folder holding trained runs is refused."""
    for req in requests:
        folder = trial_run_dir(out, req.run_name, req.spec.ns_method)
        held = existing_run_message(folder, folder / "nerfstudio_models")
        if held is not None:
            raise OutputLocationError(
                f"{folder} already holds a trained run ({held}) from an earlier certsdf-bench run; runs are never "
                f"overwritten. Pass another --results-dir, or delete {out / 'runs'} yourself."
            )


def _run_all(suite: str, cfg: BenchConfig, requests: Sequence[TrialRequest], header: dict,
             trial: Callable[..., dict] = run_trial) -> List[dict]:  # fmt: skip
    """Run the trials in order with a rich progress display; write each run's JSON as it ends.

    `trial(request, cfg.trial, suite_dir, device, progress)` runs one request (default: :func:`run_trial`)."""
    out = Path(cfg.results_dir) / suite
    refuse_earlier_trials(out, requests)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.resolved_device()
    records = []
    if any(req.spec.peer and req.spec.runnable()[0] for req in requests):
        CONSOLE.print(f"[yellow][certsdf-bench] peers: {LPIPS_NOTE}; {CHECKPOINT_NOTE}.")
    with _progress() as progress:
        overall = progress.add_task(f"{suite}: {len(requests)} runs", total=len(requests))
        for req in requests:
            runnable, why = req.spec.runnable()
            if not runnable:
                CONSOLE.print(f"[yellow][certsdf-bench] {req.spec.name}: {why}")
            task = progress.add_task(f"{req.run_name}: training", total=req.budget_s)

            def report(phase: str, done: float, total: float, task=task, name=req.run_name) -> None:
                words = {"train": "training (s)", "eval": "evaluating checkpoints", "export": "ns-export meshes"}
                progress.update(task, description=f"{name}: {words.get(phase, phase)}", completed=done, total=total)

            try:
                record = trial(req, cfg.trial, out, device, report if runnable else None)
            except Exception as exc:  # one broken method must not cost the other runs
                record = {"run": req.run_name, "method": req.spec.name, "scene": req.scene.name, "status": "failed",
                          "reason": repr(exc), "traceback": traceback.format_exc(), "training": {},
                          "evaluations": [], "meshes": [], "budget_s": req.budget_s}  # fmt: skip
            record.update(header)
            write_json(out / f"{req.run_name}.json", record)
            records.append(record)
            progress.update(task, description=f"{req.run_name}: {record['status']}", completed=req.budget_s)
            progress.advance(overall)
            if record["status"] == "failed":
                CONSOLE.print(f"[red][certsdf-bench] {req.run_name} failed: {record['reason']}")
    return records


def _header(suite: str, cfg: BenchConfig, budget_s: float) -> dict:
    return {"suite": suite, "machine": machine_info(), "budget_s": budget_s,
            "config": _jsonable(asdict(cfg))}  # fmt: skip


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _nan(value) -> float:
    """A record's number, NaN when missing (records written before the field existed) or null."""
    return math.nan if value is None else value


def _final(record: dict, key: str) -> float:
    evals = record.get("evaluations") or []
    return evals[-1][key] if evals else math.nan


# --------------------------------------------------------------------------- speed


def time_to_threshold(evals: Sequence[dict], threshold: float) -> Tuple[float, float]:
    """(first evaluated time with PSNR ≥ threshold, log-time interpolation with the previous point)."""
    points = sorted((e["train_time_s"], e["psnr"]) for e in evals)
    for i, (t, p) in enumerate(points):
        if p >= threshold:
            if i == 0:
                return t, t
            t0, p0 = points[i - 1]
            a = (threshold - p0) / (p - p0) if p != p0 else 1.0
            return t, math.exp(math.log(max(t0, 1e-6)) + a * (math.log(t) - math.log(max(t0, 1e-6))))
    return math.nan, math.nan


def run_speed(cfg: SpeedConfig) -> List[dict]:
    scene = resolve_scene(cfg.scene, cfg.scenes)
    reqs = [TrialRequest(get_method(m, cfg.trial.method_extra_args(m)), scene, f"{m}_{scene.name}", cfg.budget_s) for m in cfg.methods]
    records = _run_all("speed", cfg, reqs, _header("speed", cfg, cfg.budget_s))
    rows = []
    for r in records:
        tr = r["training"]
        hit, hit_interp = time_to_threshold(r["evaluations"], cfg.psnr_threshold)
        rows.append({"method": r["method"], "scene": r["scene"], "status": r["status"], "reason": r["reason"],
                     "budget_s": r["budget_s"], "steps": tr.get("steps", math.nan), "train_time_s": tr.get("train_time_s", math.nan),
                     "rays_per_batch": tr.get("rays_per_batch", math.nan), "rays_per_sec": tr.get("rays_per_sec", math.nan),
                     "peak_rss_mb": tr.get("peak_rss_mb", math.nan), "peak_rss_main_mb": tr.get("peak_rss_main_mb", math.nan),
                     "startup_s": tr.get("startup_s", math.nan), "mean_load_1m": tr.get("mean_load_1m", math.nan),
                     f"time_to_psnr{cfg.psnr_threshold:g}_s": hit, f"time_to_psnr{cfg.psnr_threshold:g}_interp_s": hit_interp,
                     "final_psnr": _final(r, "psnr"), "final_ssim": _final(r, "ssim"), "lpips": r.get("lpips", "")})  # fmt: skip
    ref = next((row for row in rows if row["method"] == "certsdf"), None)
    keys = ["rays_per_sec", "peak_rss_mb", f"time_to_psnr{cfg.psnr_threshold:g}_s"]
    for row in rows:
        for k in keys:
            ok = ref is not None and _pos(ref.get(k)) and _pos(row.get(k))
            row[f"certsdf_over_method_{k}"] = ref[k] / row[k] if ok else math.nan
    out = Path(cfg.results_dir) / "speed"
    write_csv(out / "summary.csv", rows)
    write_json(out / "suite.json", {**_header("speed", cfg, cfg.budget_s), "rows": rows})
    write_summary(out)
    ok_records = [r for r in records if r["status"] != "skipped"]
    skipped = [f"{r['method']}: {r['reason']}" for r in records if r["status"] == "skipped"]
    plot_lines(out / "psnr_vs_time.png", {r["method"]: [(e["train_time_s"], e["psnr"]) for e in r["evaluations"]] for r in ok_records},
               f"{scene.name}: test PSNR vs training time", "training time (s)", "PSNR (dB)", notes=skipped)  # fmt: skip
    plot_bars(out / "rays_per_sec.png", {row["method"]: row["rays_per_sec"] for row in rows if row["status"] != "skipped"},
              f"training rays/s ({scene.name}, {cfg.trial.rays_per_batch} rays/batch)", "rays / s")  # fmt: skip
    plot_bars(out / "peak_rss.png", {row["method"]: row["peak_rss_mb"] for row in rows if row["status"] != "skipped"},
              "peak RSS of the training process (+children)", "MB")  # fmt: skip
    return records


def _pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


# --------------------------------------------------------------------------- quality


def run_quality(cfg: QualityConfig) -> List[dict]:
    scenes = [resolve_scene(name, cfg.scenes) for name in cfg.scene_names]
    reqs = []
    for scene in scenes:
        for m in cfg.methods:
            reqs.append(TrialRequest(
                get_method(m, cfg.trial.method_extra_args(m)), scene, f"{m}_{scene.name}", cfg.budget_s,
                certsdf_meshes=scene.gt_mesh is not None,
                peer_exports=cfg.export if (cfg.peer_exports and m == "nerfacto") else None,
                peer_export_points=cfg.export_points,
            ))  # fmt: skip
    records = _run_all("quality", cfg, reqs, _header("quality", cfg, cfg.budget_s))
    rows = []
    for r in records:
        if r["status"] == "skipped":
            rows.append({"kind": "skipped", "scene": r["scene"], "method": r["method"], "status": r["status"], "reason": r["reason"]})
        for e in r["evaluations"]:
            rows.append({"kind": "image", "scene": r["scene"], "method": r["method"], "step": e["step"],
                         "train_time_s": e["train_time_s"], "psnr": e["psnr"], "ssim": e["ssim"], "n_views": e["n_views"]})  # fmt: skip
        for m in r["meshes"]:
            rows.append({"kind": "mesh", "scene": r["scene"], "method": m["method"], "step": m["step"],
                         "train_time_s": m["train_time_s"], "chamfer_l1": m["chamfer_l1"],
                         "fscore_0.01": m["fscore"].get("0.01", math.nan), "fscore_0.02": m["fscore"].get("0.02", math.nan),
                         "offset_median": _nan(m.get("offset_median")), "offset_mean": _nan(m.get("offset_mean")),
                         "export_s": m["export_s"], "status": m["status"], "reason": m["reason"]})  # fmt: skip
    out = Path(cfg.results_dir) / "quality"
    write_csv(out / "summary.csv", rows)
    write_json(out / "suite.json", {**_header("quality", cfg, cfg.budget_s), "rows": rows})
    write_summary(out)
    plot_quality(out, records)
    return records


# --------------------------------------------------------------------------- sigma


def run_sigma(cfg: SigmaConfig) -> List[dict]:
    scene = resolve_scene(cfg.scene, cfg.scenes)
    base = cfg.trial.method_extra_args("certsdf")
    header = _header("sigma", cfg, cfg.budget_s)

    def request(label: str, start: float, end: float, anneal_steps: Optional[int] = None) -> TrialRequest:
        args = [*base, "--pipeline.model.sigma-start-voxels", f"{start:g}", "--pipeline.model.sigma-voxels", f"{end:g}"]
        if anneal_steps is not None:
            args += ["--pipeline.model.anneal-steps", str(anneal_steps)]
        return TrialRequest(get_method("certsdf", args), scene, f"certsdf_{scene.name}_{label}", cfg.budget_s,
                            certsdf_meshes=scene.gt_mesh is not None, certificate=asdict(cfg.certify),
                            evaluate_last_only=True)  # fmt: skip

    rows_spec = [(f"sigma{s:g}", s, s) for s in cfg.sigmas]
    records = _run_all("sigma", cfg, [request(label, a, b) for label, a, b in rows_spec], header)
    if cfg.anneal is not None:
        steps = cfg.anneal_steps
        if steps <= 0:  # automatic: end the schedule halfway through what the budget allows
            done = sorted(r["training"]["steps"] for r in records if r["status"] == "ok")
            steps = max(1, int(cfg.anneal_fraction * done[len(done) // 2])) if done else 1000
        label = f"anneal{cfg.anneal[0]:g}to{cfg.anneal[1]:g}"
        rows_spec.append((label, cfg.anneal[0], cfg.anneal[1]))
        records += _run_all("sigma", cfg, [request(label, cfg.anneal[0], cfg.anneal[1], steps)], header)
        records[-1]["anneal_steps"] = steps
        write_json(Path(cfg.results_dir) / "sigma" / f"{records[-1]['run']}.json", records[-1])
    rows = []
    for (label, start, end), r in zip(rows_spec, records):
        cert = r.get("certificate") or {}
        mesh = (r["meshes"] or [{}])[-1]
        voxel = cert.get("voxel", math.nan)
        rows.append({"run": r["run"], "label": label, "sigma_start_voxels": start, "sigma_voxels": end,
                     "annealed": start != end, "anneal_steps": r.get("anneal_steps", ""),
                     "status": r["status"], "reason": r["reason"],
                     "steps": r["training"].get("steps", 0), "train_time_s": r["training"].get("train_time_s", math.nan),
                     "psnr": _final(r, "psnr"), "ssim": _final(r, "ssim"),
                     "chamfer_l1": mesh.get("chamfer_l1", math.nan),
                     "fscore_0.01": (mesh.get("fscore") or {}).get("0.01", math.nan),
                     "offset_median": _nan(mesh.get("offset_median")),
                     "bound_fraction": cert.get("bound_fraction", math.nan),
                     "bound_fraction_strict": cert.get("bound_fraction_strict", math.nan),
                     "max_excess_voxels": cert.get("max_excess_voxels", math.nan),
                     "tolerance_voxels": cert.get("tolerance_voxels", math.nan),
                     "max_abs_sdf": cert.get("max_abs_sdf", math.nan),
                     "max_distance_bound": cert.get("max_distance_bound", math.nan),
                     "max_abs_sdf_voxels": cert.get("max_abs_sdf", math.nan) / voxel,
                     "max_distance_bound_voxels": cert.get("max_distance_bound", math.nan) / voxel})  # fmt: skip
    out = Path(cfg.results_dir) / "sigma"
    write_csv(out / "summary.csv", rows)
    write_json(out / "suite.json", {**_header("sigma", cfg, cfg.budget_s), "rows": rows})
    write_summary(out)
    fixed = [row for row in rows if not row["annealed"]]
    annealed = [row for row in rows if row["annealed"]]

    def series(key: str) -> Dict[str, list]:
        s = {"fixed σ": [(row["sigma_voxels"], row[key]) for row in fixed]}
        for row in annealed:  # plotted at its final σ
            s[f"annealed {row['sigma_start_voxels']:g}→{row['sigma_voxels']:g}"] = [(row["sigma_voxels"], row[key])]
        return s

    xl = "σ (voxels; annealed runs at their final σ)"
    ticks = sorted({row["sigma_voxels"] for row in rows})
    plot_lines(out / "psnr_vs_sigma.png", series("psnr"), f"{scene.name}: test PSNR after {cfg.budget_s:g} s", xl,
               "PSNR (dB)", xticks=ticks)  # fmt: skip
    plot_lines(out / "chamfer_vs_sigma.png", series("chamfer_l1"), f"{scene.name}: Chamfer-L1 after {cfg.budget_s:g} s", xl,
               "Chamfer-L1", xticks=ticks)  # fmt: skip
    plot_lines(out / "bound_fraction_vs_sigma.png", series("bound_fraction"),
               "fraction of points with |sdf| ≤ dist. to {p̂=½} + tol", xl, "fraction", xticks=ticks)  # fmt: skip
    dist = series("max_abs_sdf_voxels")
    dist["cap σΦ⁻¹(1−ε)"] = sorted((row["sigma_voxels"], row["max_distance_bound_voxels"]) for row in rows)
    plot_lines(out / "max_distance_vs_sigma.png", dist, "largest certified distance", xl, "max |sdf| (voxels)", xticks=ticks)
    return records
