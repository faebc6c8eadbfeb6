"""One trial = one method trained on one scene under a budget, then evaluated along its curve.

Shared by all suites: budgeted training (:mod:`runner`), PSNR/SSIM of every kept checkpoint
(:mod:`evaluate`), meshes and their Chamfer/F-score on scenes with a ground-truth mesh
(:mod:`meshes`), optionally the certificate check of the last certsdf checkpoint
(:mod:`certify`). The result is one JSON-ready dict, written to `<suite>/<run>.json`.
"""

from __future__ import annotations

import gc
import shlex
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import trimesh

from certsdf_ns.bench.data import Scene
from certsdf_ns.bench.methods import MethodSpec, TrainSettings
from certsdf_ns.bench.meshes import PeerExportOptions, certsdf_grid_mesh, log_spaced_subset, peer_mesh, score_mesh
from certsdf_ns.bench.offline import CHECKPOINT_NOTE, LPIPS_NOTE
from certsdf_ns.bench.runner import RunResult, eval_targets, run_budgeted


@dataclass
class TrialOptions:
    """Options every suite shares (its CLI exposes them)."""

    rays_per_batch: int = 4096
    """train_num_rays_per_batch for every method."""
    steps_per_save: Dict[str, int] = field(default_factory=lambda: {"certsdf": 20, "nerfacto": 5, "tensorf": 10})
    """Checkpoint interval per method (steps); writes are off the clock, unneeded checkpoints deleted at once."""
    default_steps_per_save: int = 20
    """Checkpoint interval of methods not in `steps_per_save`."""
    eval_points: int = 6
    """Checkpoints evaluated per run, at log-spaced training times up to the budget, plus the first one."""
    eval_min_fraction: float = 1.0 / 32.0
    """The earliest evaluation time, as a fraction of the budget."""
    eval_times_s: Tuple[float, ...] = ()
    """Training times (s) to evaluate at instead of the log-spaced ones; the budget is always evaluated."""
    n_test_views: int = 10
    """Test views rendered per evaluation (the first N of the test split; `certsdf-bench real`: 0 = every held-out view)."""
    mesh_points: int = 100_000
    """Surface samples per mesh for Chamfer-L1 / F-score."""
    certsdf_mesh_resolution: int = 256
    """Marching-cubes lattice of certsdf meshes (certsdf-export's --resolution; 0 = the grid nodes)."""
    grace_s: float = 90.0
    """After SIGINT at the budget, how long the run may take to save and exit before SIGKILL."""
    startup_timeout_s: float = 900.0
    """Kill a run whose first training iteration has not started after this long."""
    keep_checkpoints: bool = False
    """Keep the evaluated checkpoints on disk (about 200 MB each) instead of deleting them."""
    extra_args: Tuple[str, ...] = ()
    """Extra ns-train options per method, as 'METHOD:--opt value ...' (e.g. 'nerfacto:--pipeline.model.hash-... 15')."""
    evaluate_first: bool = True
    """Also evaluate each run's first checkpoint (the start of the curve)."""
    own_budget: Tuple[str, ...] = ()
    """Methods that get the budget as their own --max-train-minutes (only certsdf), planning for it and stopping."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.own_budget if m != "certsdf"]
        if unknown:
            raise ValueError(f"--trial.own-budget {' '.join(unknown)}: only certsdf has a wall-clock budget of its own")

    def method_extra_args(self, method: str) -> List[str]:
        out: List[str] = []
        for item in self.extra_args:
            name, _, args = item.partition(":")
            if name == method:
                out += shlex.split(args)
        return out

    def runs_own_budget(self, method: str) -> bool:
        return method in self.own_budget

    def targets(self, budget_s: float, last_only: bool = False) -> List[float]:
        """The training times at which checkpoints are kept and evaluated."""
        if last_only:
            return [float(budget_s)]
        if self.eval_times_s:
            return sorted({float(t) for t in self.eval_times_s if t < budget_s} | {float(budget_s)})
        return eval_targets(budget_s, self.eval_points, self.eval_min_fraction)

    def steps_per_save_for(self, method: str) -> int:
        return int(self.steps_per_save.get(method, self.default_steps_per_save))


@dataclass
class TrialRequest:
    spec: MethodSpec
    scene: Scene
    run_name: str
    budget_s: float
    certsdf_meshes: bool = False
    """Mesh every evaluated certsdf checkpoint (grid marching cubes)."""
    peer_exports: Optional[PeerExportOptions] = None
    """ns-export tsdf/poisson of peers at a few checkpoints (None: no peer meshes)."""
    peer_export_points: int = 3
    """How many checkpoints (log-spaced, last included) get peer exports."""
    certificate: Optional[dict] = None
    """Keyword arguments of `certify.certificate_report` for the last certsdf checkpoint (None: no check)."""
    evaluate_last_only: bool = False


def run_trial(req: TrialRequest, opts: TrialOptions, out_dir: Path, device: str,
              progress: Optional[Callable[[str, float, float], None]] = None) -> dict:  # fmt: skip
    """Train, evaluate and (optionally) mesh; never raises for a failed method, records it instead.

    `progress(phase, done, total)` is called with phase 'train' (seconds) and 'eval' (checkpoints).
    """
    spec, scene = req.spec, req.scene
    settings = TrainSettings(opts.rays_per_batch, scene.scale, opts.steps_per_save_for(spec.name), device,
                             scratch_dir=Path(out_dir) / "scenes")  # fmt: skip
    targets = opts.targets(req.budget_s, req.evaluate_last_only)
    record: dict = {
        "run": req.run_name, "method": spec.name, "scene": scene.name, "scene_path": str(scene.path),
        "camera_res_scale_factor": scene.scale, "budget_s": req.budget_s, "settings": asdict(settings),
        "lpips": LPIPS_NOTE if spec.peer else "not used (certsdf skips LPIPS when its weights are not cached)",
        "checkpoint_loading": CHECKPOINT_NOTE if spec.peer else "torch.load defaults",
        "eval_targets_s": targets, "n_test_views": opts.n_test_views, "own_budget": opts.runs_own_budget(spec.name),
    }  # fmt: skip
    train_and_evaluate(req, opts, settings, targets, Path(out_dir), record, _evaluate_run, progress)
    return record


def train_and_evaluate(req: TrialRequest, opts: TrialOptions, settings: TrainSettings, targets: Sequence[float],
                       out_dir: Path, record: dict, evaluate: Callable, progress=None) -> RunResult:  # fmt: skip
    """Budgeted training, then ``evaluate(req, opts, run, out_dir, record, progress)`` off the clock,
    recorded into ``record``; the evaluated checkpoints are deleted afterwards (unless kept)."""
    run: RunResult = run_budgeted(
        req.spec, req.scene.path, settings, req.budget_s, out_dir, req.run_name, targets,
        grace_s=opts.grace_s, startup_timeout_s=opts.startup_timeout_s,
        on_progress=(lambda t: progress("train", t, req.budget_s)) if progress else None,
        keep_first=opts.evaluate_first, own_budget=opts.runs_own_budget(req.spec.name),
    )  # fmt: skip
    record["training"] = run.to_json()
    record["status"], record["reason"] = run.status, run.reason
    record["evaluations"], record["meshes"] = [], []
    t0 = time.perf_counter()
    evaluated = False
    try:
        if run.status == "ok":
            evaluate(req, opts, run, out_dir, record, progress)
            record["evaluation_wall_s"] = time.perf_counter() - t0  # off the clock: renders + exports
            evaluated = record["status"] == "ok"
    finally:
        # ~200 MB each; the JSON keeps what was measured. A run that was not evaluated keeps them: it can
        # be evaluated again (ns-eval, certsdf-export) instead of trained again.
        if evaluated and not opts.keep_checkpoints:
            for c in run.kept_checkpoints:
                Path(c.path).unlink(missing_ok=True)
        elif not evaluated:
            record["checkpoints_kept"] = [c.path for c in run.kept_checkpoints]
    return run


def _evaluate_run(req: TrialRequest, opts: TrialOptions, run: RunResult, out_dir: Path, record: dict, progress) -> None:
    """Image metrics (and certsdf meshes/certificate) in-process, then peer exports in subprocesses."""
    spec, scene = req.spec, req.scene
    ckpts = run.kept_checkpoints[-1:] if req.evaluate_last_only else run.kept_checkpoints
    times = {c.step: c.train_time_s for c in ckpts}
    gt = trimesh.load(str(scene.gt_mesh), force="mesh") if scene.gt_mesh is not None else None
    try:
        _evaluate(req, opts, run, ckpts, times, gt, record, progress)
    except Exception as exc:  # a method that cannot be evaluated is a result too
        record["status"], record["reason"] = "failed", f"evaluation: {exc!r}"
        record["traceback"] = traceback.format_exc()
    if req.peer_exports is not None and gt is not None and spec.peer:
        jobs = [(c, kind) for c in log_spaced_subset(ckpts, req.peer_export_points) for kind in req.peer_exports.kinds]
        for i, (c, kind) in enumerate(jobs):
            if progress:
                progress("export", i, len(jobs))
            out = Path(out_dir) / "runs" / req.run_name / "exports" / f"step{c.step}"
            res, mesh = peer_mesh(spec.name, kind, Path(run.config_path), c.step, c.train_time_s, out, req.peer_exports)
            if mesh is not None:
                score_mesh(res, mesh, gt, opts.mesh_points)
            record["meshes"].append(res.to_json())


def _evaluate(req: TrialRequest, opts: TrialOptions, run: RunResult, ckpts: Sequence, times: Dict[int, float],
              gt: Optional[trimesh.Trimesh], record: dict, progress) -> None:  # fmt: skip
    from certsdf_ns.bench.evaluate import iter_checkpoints, render_metrics, test_views
    from certsdf_ns.bench.meshes import MeshResult

    cameras, images = test_views(req.scene.path, req.scene.scale, opts.n_test_views)
    pipeline = None
    for i, (step, pipeline) in enumerate(iter_checkpoints(Path(run.config_path), [(c.step, Path(c.path)) for c in ckpts])):
        metrics = render_metrics(pipeline, cameras, images, step).to_json()
        metrics["train_time_s"] = times[step]
        record["evaluations"].append(metrics)
        is_certsdf = hasattr(getattr(pipeline.model, "field", None), "geometry")
        if req.certsdf_meshes and gt is not None and is_certsdf:
            res = MeshResult("certsdf-grid", step, times[step])
            t0 = time.perf_counter()
            mesh = certsdf_grid_mesh(pipeline.model.field, opts.certsdf_mesh_resolution)
            res.export_s = time.perf_counter() - t0
            record["meshes"].append(score_mesh(res, mesh, gt, opts.mesh_points).to_json())
        if req.certificate is not None and is_certsdf and i == len(ckpts) - 1:
            from certsdf_ns.bench.certify import certificate_report

            record["certificate"] = certificate_report(pipeline.model.field.geometry, **req.certificate).to_json()
        if progress:
            progress("eval", i + 1, len(ckpts))
    del pipeline
    gc.collect()
