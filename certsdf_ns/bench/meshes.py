"""Meshes along the training curve and their distance to the ground truth.

- certsdf: marching cubes on the certified SDF at its zero level, with the extraction of
  `certsdf-export` (:func:`certsdf_ns.export.mesh.extract_mesh`), in the scene frame.
- nerfacto (or any peer with a depth output): nerfstudio's own `ns-export tsdf` and
  `ns-export poisson`, launched through :mod:`certsdf_ns.bench.peer_export` (LPIPS stub, chosen
  checkpoint) in a subprocess with a time limit, since on CPU they render thousands of rays
  per view. The time each export took is recorded; a timeout is a result, not a crash.

Blender scenes have no dataparser transform, so every mesh is in the frame of `gt_mesh.ply`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import trimesh

from certsdf_ns.export.geometry_eval import evaluate_mesh
from certsdf_ns.export.mesh import NoSurfaceError, extract_mesh


@dataclass
class MeshResult:
    """One extracted mesh and its geometry metrics (NaN when the export failed)."""

    method: str
    """'certsdf-grid', 'nerfacto-tsdf', 'nerfacto-poisson', ..."""
    step: int
    train_time_s: float
    status: str = "ok"
    """'ok', 'timeout', 'failed' or 'empty'."""
    reason: str = ""
    export_s: float = float("nan")
    path: str = ""
    chamfer_l1: float = float("nan")
    fscore: Dict[str, float] = field(default_factory=dict)
    normal_consistency: float = float("nan")
    offset_median: float = float("nan")
    """Median signed offset along the true outward normal (negative: the mesh lies inside)."""
    offset_mean: float = float("nan")
    """Mean signed offset (see certsdf_ns.export.geometry_eval)."""
    n_faces: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def certsdf_grid_mesh(field_module, resolution: int = 256) -> trimesh.Trimesh:
    """Zero level set of a certsdf field's certified SDF, in world (scene) coordinates: what
    `certsdf-export` writes at the same lattice. No zero crossing gives an empty mesh (scored 'empty')."""
    try:
        return extract_mesh(field_module.geometry, resolution=resolution)
    except NoSurfaceError:
        return trimesh.Trimesh()


def score_mesh(result: MeshResult, mesh: trimesh.Trimesh, gt: trimesh.Trimesh, n_points: int) -> MeshResult:
    """Fill Chamfer-L1, F-scores, normal consistency and signed offset; an empty mesh is recorded, not raised."""
    if len(mesh.faces) == 0 or not mesh.area > 0:
        result.status, result.reason = "empty", "no surface extracted"
        return result
    m = evaluate_mesh(mesh, gt, n_points=n_points)
    result.chamfer_l1 = m.chamfer_l1
    result.fscore = {str(k): v for k, v in m.fscore.items()}
    result.normal_consistency = m.normal_consistency
    result.offset_median, result.offset_mean = m.offset_median, m.offset_mean
    result.n_faces = len(mesh.faces)
    return result


@dataclass
class PeerExportOptions:
    """ns-export settings for peer meshes (nerfstudio's defaults unless stated)."""

    kinds: Sequence[str] = ("tsdf", "poisson")
    """Which ns-export commands to run."""
    timeout_s: float = 600.0
    """Time limit per export (rendering thousands of rays per view is slow on CPU)."""
    bbox: float = 1.0
    """Export box [-bbox, bbox]^3 (generated objects span [-0.9, 0.9])."""
    tsdf_downscale: int = 2
    """TSDF renders the training views at 1/downscale of their resolution (nerfstudio: 2)."""
    poisson_points: int = 200_000
    """Points rendered for Poisson reconstruction (nerfstudio's default 1e6 takes far longer on CPU)."""


def peer_export_args(kind: str, config: Path, out_dir: Path, step: int, opts: PeerExportOptions) -> List[str]:
    lo, hi = [str(-opts.bbox)] * 3, [str(opts.bbox)] * 3
    common = ["--load-config", str(config), "--output-dir", str(out_dir),
              "--bounding-box-min", *lo, "--bounding-box-max", *hi]  # fmt: skip
    if kind == "tsdf":
        # Texturing (xatlas + NeRF colours) is irrelevant to geometry and slow: use the TSDF colours.
        extra = ["--texture-method", "tsdf", "--downscale-factor", str(opts.tsdf_downscale)]
    elif kind == "poisson":
        # nerfacto has no normal output unless trained with predict_normals: estimate them with open3d.
        extra = ["--normal-method", "open3d", "--texture-method", "point_cloud", "--num-points", str(opts.poisson_points)]
    else:
        raise ValueError(f"unknown export {kind!r}")
    return [sys.executable, "-m", "certsdf_ns.bench.peer_export", "--bench-load-step", str(step), kind, *common, *extra]


def peer_mesh(method: str, kind: str, config: Path, step: int, train_time_s: float, out_dir: Path,
              opts: PeerExportOptions) -> tuple:  # fmt: skip
    """Run one ns-export; returns (MeshResult, mesh or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = MeshResult(f"{method}-{kind}", step, train_time_s)
    cmd = peer_export_args(kind, config, out_dir, step, opts)
    log_path = out_dir / f"{kind}.log"
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            proc.wait(timeout=opts.timeout_s)
        except subprocess.TimeoutExpired:
            result.status, result.reason = "timeout", f"ns-export {kind} exceeded {opts.timeout_s:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    result.export_s = time.perf_counter() - t0
    mesh_path = out_dir / f"{kind}_mesh.ply"
    if result.status == "ok" and (proc.returncode != 0 or not mesh_path.exists()):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        result.status, result.reason = "failed", f"ns-export {kind} exit {proc.returncode}: {tail[0][:300]}"
    if result.status != "ok":
        return result, None
    result.path = str(mesh_path)
    mesh = trimesh.load(str(mesh_path), force="mesh")
    return result, mesh if isinstance(mesh, trimesh.Trimesh) else trimesh.Trimesh()


def log_spaced_subset(items: Sequence, n: int) -> List:
    """At most n items, spread log-uniformly over the index range, always including the last."""
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[-1]]
    idx = np.unique(np.round(np.geomspace(1, len(items), n)).astype(int) - 1)
    return [items[i] for i in idx]
