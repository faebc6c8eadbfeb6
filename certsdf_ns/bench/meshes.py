"""Meshes along the training curve and their distance to the ground truth.

- certsdf: marching cubes on the certified SDF at its zero level, with the extraction of
  `certsdf-export` (:func:`certsdf_ns.export.mesh.extract_mesh`), in the scene frame.
- nerfacto (or any peer with a depth output): nerfstudio's own `ns-export tsdf` and
  `ns-export poisson`, launched through :mod:`certsdf_ns.bench.peer_export` (LPIPS stub, chosen
  checkpoint) in a subprocess with a time limit, since on CPU they render thousands of rays
  per view. The time each export took is recorded; a timeout is a result, not a crash.

Blender scenes have no dataparser transform, so every mesh is in the frame of `gt_mesh.ply`.

Real captures have no ground-truth mesh: :func:`silhouette_scores` ray-casts a mesh from each
held-out camera and compares the pixels it covers with the object mask (IoU and coverage), and
:func:`mesh_picture` renders it, grey, beside the photograph.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def peer_export_args(kind: str, config: Path, out_dir: Path, step: int, opts: PeerExportOptions,
                     box: Optional[Sequence[Sequence[float]]] = None) -> List[str]:  # fmt: skip
    """ns-export arguments; `box` ([min xyz, max xyz]) replaces the symmetric [-bbox, bbox]³ of `opts`."""
    lo, hi = [str(-opts.bbox)] * 3, [str(opts.bbox)] * 3
    if box is not None:
        lo, hi = [f"{float(v):.6g}" for v in box[0]], [f"{float(v):.6g}" for v in box[1]]
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
              opts: PeerExportOptions, box: Optional[Sequence[Sequence[float]]] = None) -> tuple:  # fmt: skip
    """Run one ns-export (in `box`, see :func:`peer_export_args`); returns (MeshResult, mesh or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = MeshResult(f"{method}-{kind}", step, train_time_s)
    cmd = peer_export_args(kind, config, out_dir, step, opts, box)
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


# --------------------------------------------------------------------------- silhouettes (real captures)


@dataclass
class MeshView:
    """A mesh ray-cast from one camera: which pixels' rays hit it, and their Lambertian shade."""

    hit: np.ndarray
    """[H, W] bool."""
    shade: np.ndarray
    """[H, W] in [0, 1]: |n · d| of the first face hit (headlight at the camera), 0 where missed."""

    def grey(self) -> np.ndarray:
        """[H, W] in [0, 1]: the mesh in grey, shaded, on white (the bench's and the scripts' pictures)."""
        return np.where(self.hit, 0.15 + 0.8 * self.shade, 1.0)


def cast_mesh(mesh: trimesh.Trimesh, camera) -> MeshView:
    """Cast one ray per pixel of a one-camera nerfstudio `Cameras` (its own ray generation,
    distortion included) at the mesh, with trimesh's ray intersector (Embree when embreex is
    installed). The mesh must be in the camera's frame (the dataparser's)."""
    bundle = camera.generate_rays(camera_indices=0, keep_shape=True)
    origins = bundle.origins.detach().cpu().double().numpy()
    directions = bundle.directions.detach().cpu().double().numpy()
    height, width = origins.shape[:2]
    hit = np.zeros((height, width), dtype=bool)
    shade = np.zeros((height, width), dtype=np.float64)
    if len(mesh.faces) == 0:
        return MeshView(hit, shade)
    faces = mesh.ray.intersects_first(origins.reshape(-1, 3), directions.reshape(-1, 3))
    flat_hit = faces >= 0
    normals = mesh.face_normals[faces[flat_hit]]
    cosine = np.abs(np.einsum("ij,ij->i", normals, directions.reshape(-1, 3)[flat_hit]))
    hit.reshape(-1)[flat_hit] = True
    shade.reshape(-1)[flat_hit] = np.clip(cosine, 0.0, 1.0)
    return MeshView(hit, shade)


def silhouette_iou_coverage(hit: np.ndarray, mask: np.ndarray) -> tuple:
    """(|hit ∧ M| / |hit ∨ M|, |hit ∧ M| / |M|) of a mesh's hit mask and an object mask M."""
    hit, mask = np.asarray(hit, dtype=bool), np.asarray(mask, dtype=bool)
    inter = float(np.logical_and(hit, mask).sum())
    union = float(np.logical_or(hit, mask).sum())
    area = float(mask.sum())
    return (inter / union if union > 0 else float("nan")), (inter / area if area > 0 else float("nan"))


def silhouette_scores(mesh: trimesh.Trimesh, cameras, masks: Sequence, labels: Sequence[str]) -> dict:
    """Silhouette IoU and coverage of the mesh against each view's object mask, and their means."""
    per_view = []
    for i, (mask, label) in enumerate(zip(masks, labels)):
        view = cast_mesh(mesh, cameras[i : i + 1])
        m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        if view.hit.shape != m.shape:
            raise ValueError(f"view {label}: the camera is {view.hit.shape} pixels but the mask {m.shape}")
        iou, coverage = silhouette_iou_coverage(view.hit, m)
        per_view.append({"view": label, "iou": iou, "coverage": coverage, "hit_fraction": float(view.hit.mean())})
    n = max(len(per_view), 1)
    return {"iou": sum(v["iou"] for v in per_view) / n, "coverage": sum(v["coverage"] for v in per_view) / n,
            "per_view": per_view}  # fmt: skip


def mesh_picture(path: Path, mesh: trimesh.Trimesh, camera, image) -> Path:
    """PNG: the mesh seen from `camera` (grey, Lambertian shading of the hit normals, white
    background) next to the ground-truth image from the same camera."""
    left = np.repeat(cast_mesh(mesh, camera).grey()[..., None], 3, axis=-1)
    right = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image, dtype=np.float64)
    if right.shape[:2] != left.shape[:2]:
        raise ValueError(f"the image is {right.shape[:2]} but the camera {left.shape[:2]}")
    gap = np.ones((left.shape[0], 4, 3))
    return save_picture(path, np.concatenate([left, gap, right[..., :3]], axis=1))


def save_picture(path: Path, picture: np.ndarray) -> Path:
    """PNG of an [H, W] or [H, W, 3] picture with values in [0, 1]."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(picture, 0.0, 1.0) * 255).astype(np.uint8)).save(path)
    return path


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
