"""Tests of certsdf_ns.export.geometry_eval: metric values on known shapes and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from certsdf_ns.export.geometry_eval import MeshMetrics, evaluate_mesh
from certsdf_ns.data.scenes import procedural_demo_mesh

REPO_ROOT = Path(__file__).resolve().parents[1]


def _sphere(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # The package may not be pip-installed: make the subprocess import it from the repo.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "certsdf_ns.export.geometry_eval", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_identical_meshes_score_perfectly() -> None:
    mesh = procedural_demo_mesh()
    # Surfaces are sampled independently, so the floor is ~0.5*sqrt(area/n): use enough
    # points (area ~4.3) to bring it under 2e-3.
    m = evaluate_mesh(mesh, mesh.copy(), n_points=400_000)
    assert m.chamfer_l1 < 2e-3
    assert m.accuracy < 2e-3 and m.completeness < 2e-3
    assert m.fscore[0.01] > 0.999 and m.fscore[0.02] == pytest.approx(1.0)
    assert m.normal_consistency > 0.99
    assert (m.n_pred_vertices, m.n_pred_faces) == (len(mesh.vertices), len(mesh.faces))


def test_sampling_floor_shrinks_with_more_points() -> None:
    mesh = _sphere(0.5)
    coarse = evaluate_mesh(mesh, mesh, n_points=10_000).chamfer_l1
    fine = evaluate_mesh(mesh, mesh, n_points=160_000).chamfer_l1
    # Floor ~ 1/sqrt(n): 16x the points -> ~4x smaller.
    assert 3.0 < coarse / fine < 5.0
    assert fine == pytest.approx(0.5 * np.sqrt(mesh.area / 160_000), rel=0.15)


def test_concentric_spheres() -> None:
    m = evaluate_mesh(_sphere(0.5), _sphere(0.55), thresholds=(0.01, 0.1))
    assert m.chamfer_l1 == pytest.approx(0.05, rel=0.1)
    assert m.accuracy == pytest.approx(0.05, rel=0.1) and m.completeness == pytest.approx(0.05, rel=0.1)
    assert m.fscore[0.01] < 0.01
    assert m.fscore[0.1] == 1.0
    assert m.precision[0.1] == 1.0 and m.recall[0.1] == 1.0
    assert m.normal_consistency > 0.99  # same normals, just offset


@pytest.mark.parametrize("delta", [0.008, -0.008])
def test_signed_offset_of_a_shifted_sphere(delta: float) -> None:
    """A sphere of radius r + δ against one of radius r: offset +δ (outside) or −δ (inside)."""
    m = evaluate_mesh(_sphere(0.5 + delta), _sphere(0.5), n_points=50_000)
    # The projection on the normal removes the tangential sampling error: error ≪ δ.
    assert m.offset_median == pytest.approx(delta, abs=5e-4)
    assert m.offset_mean == pytest.approx(delta, abs=5e-4)
    assert m.offset_fraction == 1.0


def test_signed_offset_ignores_winding_and_far_samples() -> None:
    """An inside-out ground truth still gives outward normals; a floater beyond the cut-off is not averaged."""
    gt = _sphere(0.5)
    gt.invert()
    floater = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    floater.apply_translation([0.9, 0.0, 0.0])
    pred = trimesh.util.concatenate([_sphere(0.51), floater])
    m = evaluate_mesh(pred, gt, n_points=50_000, offset_max_distance=0.05)
    assert m.offset_median == pytest.approx(0.01, abs=5e-4)
    assert m.offset_mean == pytest.approx(0.01, abs=5e-4)
    assert 0.9 < m.offset_fraction < 1.0


def test_partial_prediction_hits_completeness_not_accuracy() -> None:
    gt = procedural_demo_mesh()
    pred = gt.split(only_watertight=False)[0]  # one of the three parts only
    m = evaluate_mesh(pred, gt, n_points=50_000)
    assert m.accuracy < 0.01  # everything predicted is on the gt surface
    assert m.completeness > 0.1  # but most of the gt surface is missing
    assert m.precision[0.02] > 0.99 and m.recall[0.02] < 0.8
    assert m.fscore[0.02] == pytest.approx(2 * m.precision[0.02] * m.recall[0.02] / (m.precision[0.02] + m.recall[0.02]))


def test_flipped_normals_do_not_matter() -> None:
    mesh = _sphere(0.5)
    flipped = mesh.copy()
    flipped.invert()  # normal consistency uses |cos|: orientation-agnostic
    assert evaluate_mesh(flipped, mesh, n_points=20_000).normal_consistency > 0.99


def test_seeded_result_is_reproducible() -> None:
    a = evaluate_mesh(_sphere(0.5), _sphere(0.52), n_points=5000, seed=7)
    b = evaluate_mesh(_sphere(0.5), _sphere(0.52), n_points=5000, seed=7)
    assert a == b


def test_empty_pred_raises() -> None:
    empty = trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=int))
    with pytest.raises(ValueError, match="empty"):
        evaluate_mesh(empty, _sphere(0.5))


def test_cli_writes_json(tmp_path: Path) -> None:
    pred, gt, out = tmp_path / "pred.ply", tmp_path / "gt.ply", tmp_path / "res/metrics.json"
    _sphere(0.5).export(pred)
    _sphere(0.55).export(gt)
    proc = _run_cli(str(pred), str(gt), "--n-points", "20000", "--thresholds", "0.01", "0.1", "--offset-max-distance", "0.1",
                    "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "chamfer" in proc.stdout.lower()
    data = json.loads(out.read_text())
    assert set(data) == set(MeshMetrics.__dataclass_fields__)
    assert data["chamfer_l1"] == pytest.approx(0.05, rel=0.1)
    assert data["fscore"]["0.1"] == 1.0 and data["fscore"]["0.01"] < 0.01
    assert data["offset_median"] == pytest.approx(-0.05, abs=2e-3)  # pred inside gt
    assert "signed offset" in proc.stdout


EMPTY_PLY = (
    "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
    "property float z\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n"
)


@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "no_faces"])
def test_cli_bad_pred_exits_2(tmp_path: Path, kind: str) -> None:
    gt = tmp_path / "gt.ply"
    _sphere(0.5).export(gt)
    pred = tmp_path / f"{kind}_pred.ply"
    if kind == "zero_bytes":
        pred.write_bytes(b"")
    elif kind == "no_faces":  # a valid PLY with nothing in it, e.g. an empty extraction
        pred.write_text(EMPTY_PLY)
    proc = _run_cli(str(pred), str(gt))
    assert proc.returncode == 2
    assert f"{kind}_pred.ply" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
