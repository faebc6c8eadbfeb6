"""Mesh-vs-ground-truth geometry metrics (accuracy, completeness, Chamfer, F-score, NC).

Definitions follow the usual DTU / Occupancy Networks / MonoSDF evaluation:

* ``n_points`` points are sampled uniformly on each surface (with their face normals);
* accuracy     = mean distance from predicted points to their nearest ground-truth point;
* completeness = mean distance from ground-truth points to their nearest predicted point;
* chamfer_l1   = (accuracy + completeness) / 2;
* precision(t) / recall(t) = fraction of predicted / ground-truth points within ``t``;
  F(t) = 2PR / (P + R);
* normal consistency = mean over both directions of |n_a . n_b(nearest)|;
* signed offset = median (and mean) of (p − q)·n_q over predicted samples p, with q the nearest
  ground-truth sample and n_q its *outward* face normal, over the p within
  ``offset_max_distance`` of q (default 0.05, ~3 voxels of a 192³ grid over [-1.5, 1.5]³;
  farther samples are floaters or missing parts, not a displaced surface). Positive = the
  prediction lies outside the true surface, negative = inside (shrunk). Projecting on the normal
  removes the tangential part of p − q, so unlike Chamfer it has no sampling floor, only noise.

Distances are in the units of the meshes: in a ``certsdf_ns.data.scenes`` scene the object
spans [-0.9, 0.9], so the default thresholds 0.01 and 0.02 are about 0.6% and 1.1% of
its size. The two surfaces are sampled independently, so even identical meshes show a
small sampling floor of about 0.5 * sqrt(area / n_points) in accuracy/completeness.

Command line: ``certsdf-eval-mesh PRED_MESH GT_MESH [--n-points N] [--thresholds ...]
[--offset-max-distance D] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from certsdf_ns.data.scenes import read_mesh
from certsdf_ns.output_paths import check_writable_file


@dataclass
class MeshMetrics:
    """Metrics of a predicted mesh against the ground truth (distances in mesh units)."""

    accuracy: float
    completeness: float
    chamfer_l1: float
    fscore: dict[float, float]
    precision: dict[float, float]
    recall: dict[float, float]
    normal_consistency: float
    n_pred_vertices: int
    n_pred_faces: int
    offset_median: float = float("nan")
    """Median signed offset (p − q)·n_q along the true outward normal (negative = inside)."""
    offset_mean: float = float("nan")
    """Mean of the same (more sensitive to the tails than the median)."""
    offset_fraction: float = float("nan")
    """Fraction of predicted samples within offset_max_distance of the truth (those averaged)."""
    offset_max_distance: float = float("nan")
    """The distance cut-off used for the offset."""

    def to_json(self) -> dict:
        """JSON-friendly dict (threshold keys become strings, as JSON requires)."""
        out = asdict(self)
        for key in ("fscore", "precision", "recall"):
            out[key] = {str(t): v for t, v in out[key].items()}
        return out


def _check_nonempty(mesh: trimesh.Trimesh, name: str) -> None:
    # Sampling needs triangles with area; an empty extraction (e.g. marching cubes that
    # found no zero crossing) must fail loudly rather than produce NaN metrics.
    if mesh is None or len(mesh.vertices) == 0 or len(mesh.faces) == 0 or not mesh.area > 0:
        raise ValueError(f"{name} mesh is empty (no triangles with non-zero area)")


def sample_with_normals(mesh: trimesh.Trimesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-uniform surface samples and the unit normals of their faces."""
    points, face_index = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(points), np.asarray(mesh.face_normals[face_index])


def _one_way(src: np.ndarray, src_n: np.ndarray, dst: np.ndarray, dst_n: np.ndarray):
    """Distances from ``src`` points to nearest ``dst`` points, and |cos| of their normals."""
    dist, idx = cKDTree(dst).query(src, k=1, workers=-1)
    cos = np.abs(np.einsum("ij,ij->i", src_n, dst_n[idx]))
    return dist, cos


def outward_sign(mesh: trimesh.Trimesh) -> float:
    """+1 if the mesh's face normals point out of the solid, −1 if it is wound inside-out.

    The signed offset needs the true outward side; an inside-out winding (negative signed
    volume) would flip the sign of every offset.
    """
    return -1.0 if float(mesh.volume) < 0 else 1.0


def signed_offset(
    pred_points: np.ndarray, gt_points: np.ndarray, gt_normals: np.ndarray, max_distance: float = 0.05
) -> tuple[float, float, float]:
    """(median, mean, fraction used) of (p − q)·n_q, q the nearest ground-truth sample to p.

    Only the p with |p − q| ≤ max_distance count (a displaced surface, not a floater).
    NaN when none do.
    """
    dist, idx = cKDTree(gt_points).query(pred_points, k=1, workers=-1)
    near = dist <= max_distance
    if not near.any():
        return float("nan"), float("nan"), 0.0
    offset = np.einsum("ij,ij->i", pred_points[near] - gt_points[idx[near]], gt_normals[idx[near]])
    return float(np.median(offset)), float(offset.mean()), float(near.mean())


def evaluate_mesh(
    pred: trimesh.Trimesh,
    gt: trimesh.Trimesh,
    n_points: int = 100_000,
    thresholds: Sequence[float] = (0.01, 0.02),
    seed: int = 0,
    offset_max_distance: float = 0.05,
) -> MeshMetrics:
    """Compare ``pred`` with ``gt``; raises ``ValueError`` if either mesh is empty."""
    _check_nonempty(pred, "predicted")
    _check_nonempty(gt, "ground-truth")
    if n_points < 1:
        raise ValueError("n_points must be >= 1")
    # Independent seeds: reusing one would make samples of identical meshes coincide
    # and hide the sampling floor that every real comparison has.
    p_pts, p_nrm = sample_with_normals(pred, n_points, seed)
    g_pts, g_nrm = sample_with_normals(gt, n_points, seed + 1)
    d_pred, cos_pred = _one_way(p_pts, p_nrm, g_pts, g_nrm)
    d_gt, cos_gt = _one_way(g_pts, g_nrm, p_pts, p_nrm)

    precision, recall, fscore = {}, {}, {}
    for t in thresholds:
        p, r = float(np.mean(d_pred < t)), float(np.mean(d_gt < t))
        precision[float(t)], recall[float(t)] = p, r
        fscore[float(t)] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    acc, comp = float(d_pred.mean()), float(d_gt.mean())
    off_median, off_mean, off_fraction = signed_offset(p_pts, g_pts, outward_sign(gt) * g_nrm, offset_max_distance)
    return MeshMetrics(
        accuracy=acc,
        completeness=comp,
        chamfer_l1=(acc + comp) / 2,
        fscore=fscore,
        precision=precision,
        recall=recall,
        normal_consistency=float((cos_pred.mean() + cos_gt.mean()) / 2),
        n_pred_vertices=len(pred.vertices),
        n_pred_faces=len(pred.faces),
        offset_median=off_median,
        offset_mean=off_mean,
        offset_fraction=off_fraction,
        offset_max_distance=float(offset_max_distance),
    )


# --------------------------------------------------------------------------- CLI


def _load(path: Path, role: str) -> trimesh.Trimesh:
    mesh = read_mesh(path)  # ValueError naming the file if missing/unreadable/no faces
    try:
        _check_nonempty(mesh, role)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return mesh


def print_table(metrics: MeshMetrics, pred_path: Path, gt_path: Path) -> None:
    """Human-readable summary with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pred_path} vs {gt_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy (pred→gt)", f"{metrics.accuracy:.5f}")
    table.add_row("completeness (gt→pred)", f"{metrics.completeness:.5f}")
    table.add_row("chamfer L1", f"{metrics.chamfer_l1:.5f}")
    for t in metrics.fscore:
        table.add_row(
            f"F-score @ {t:g}",
            f"{metrics.fscore[t]:.4f} (P {metrics.precision[t]:.4f}, R {metrics.recall[t]:.4f})",
        )
    table.add_row("normal consistency", f"{metrics.normal_consistency:.4f}")
    table.add_row(
        "signed offset median / mean",
        f"{metrics.offset_median:+.5f} / {metrics.offset_mean:+.5f} "
        f"({metrics.offset_fraction:.1%} of samples within {metrics.offset_max_distance:g}; − = inside)",
    )
    table.add_row("pred vertices / faces", f"{metrics.n_pred_vertices} / {metrics.n_pred_faces}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``certsdf-eval-mesh``; bad input exits with code 2 and one line."""
    p = argparse.ArgumentParser(prog="certsdf-eval-mesh", description=__doc__.split("\n")[0])
    p.add_argument("pred_mesh", type=Path)
    p.add_argument("gt_mesh", type=Path)
    p.add_argument("--n-points", type=int, default=100_000)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.02])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offset-max-distance", type=float, default=0.05,
                   help="signed offset: only predicted samples this close to the truth count")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = p.parse_args(argv)
    try:
        if args.json is not None:
            check_writable_file(args.json, "--json")  # before the (slow) metrics
        pred = _load(args.pred_mesh, "predicted")
        gt = _load(args.gt_mesh, "ground-truth")
        metrics = evaluate_mesh(pred, gt, args.n_points, args.thresholds, args.seed, args.offset_max_distance)
    except ValueError as exc:
        print(f"certsdf-eval-mesh: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_table(metrics, args.pred_mesh, args.gt_mesh)
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(metrics.to_json(), indent=2))
        except OSError as exc:
            print(f"certsdf-eval-mesh: error: cannot write {args.json}: {exc}", file=sys.stderr)
            sys.exit(2)
    return 0


if __name__ == "__main__":
    main()
