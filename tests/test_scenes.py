"""Tests of certsdf_ns.data.scenes: Blender-format layout, camera convention, gt mesh, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from certsdf_ns.data.scenes import (
    CAMERA_ANGLE_X,
    Shader,
    fitting_radius,
    load_and_normalise_mesh,
    look_at_origin,
    make_scene,
    procedural_demo_mesh,
    render_view,
    split_poses,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNNY = REPO_ROOT.parent / "shared/data/meshes/bunny.obj"
SIZE = 32
COUNTS = {"train": 6, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    returned = make_scene(
        out, image_size=SIZE, n_train=COUNTS["train"], n_val=COUNTS["val"], n_test=COUNTS["test"], seed=3
    )
    assert Path(returned) == out
    return out


def _frames(scene: Path, split: str) -> dict:
    return json.loads((scene / f"transforms_{split}.json").read_text())


def _cli_env() -> dict:
    # The package may not be pip-installed: make the subprocess import it from the repo.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_transforms_and_images(scene: Path, split: str) -> None:
    meta = _frames(scene, split)
    assert meta["camera_angle_x"] == pytest.approx(0.6911, abs=1e-4)
    assert len(meta["frames"]) == COUNTS[split]
    for i, frame in enumerate(meta["frames"]):
        assert frame["file_path"] == f"./{split}/r_{i}"  # no extension, like NeRF-synthetic
        assert np.asarray(frame["transform_matrix"]).shape == (4, 4)
        img = np.asarray(Image.open(scene / f"{split}/r_{i}.png"))
        assert img.shape == (SIZE, SIZE, 4) and img.dtype == np.uint8
        alpha = img[..., 3]
        assert (alpha == 0).any() and (alpha == 255).any()
        # The whole object is in view: nothing touches the image border.
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert (border == 0).all()
        # Object pixels are centred (the object's bbox is centred on the look-at point).
        rows, cols = np.nonzero(alpha > 0)
        assert abs(rows.mean() - SIZE / 2) < SIZE / 6 and abs(cols.mean() - SIZE / 2) < SIZE / 6
        # Saturated, textured colours: foreground is not grey and not a single colour.
        # (max-min)/max is the HSV saturation, which Lambertian shading leaves unchanged.
        rgb = img[..., :3][alpha == 255].astype(float)
        saturation = (rgb.max(axis=1) - rgb.min(axis=1)) / np.maximum(rgb.max(axis=1), 1)
        assert saturation.mean() > 0.5
        assert len(np.unique(rgb, axis=0)) > 5


def test_camera_matrices_look_at_origin(scene: Path) -> None:
    positions = []
    for split in ("train", "val", "test"):
        for frame in _frames(scene, split)["frames"]:
            c2w = np.asarray(frame["transform_matrix"])
            rot, pos = c2w[:3, :3], c2w[:3, 3]
            np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-9)
            assert np.linalg.det(rot) == pytest.approx(1.0)
            np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
            # OpenGL: the camera looks down its -z axis, which must point at the origin.
            np.testing.assert_allclose(-rot[:, 2], -pos / np.linalg.norm(pos), atol=1e-9)
            assert np.linalg.norm(pos) == pytest.approx(4.0)
            elevation = np.degrees(np.arcsin(pos[2] / np.linalg.norm(pos)))
            assert -30.0 - 1e-6 <= elevation <= 80.0 + 1e-6
            assert rot[2, 0] == pytest.approx(0.0, abs=1e-9)  # x axis horizontal: upright images
            positions.append(pos)
    positions = np.asarray(positions)
    # Train, val and test cameras are all at different positions.
    dists = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    assert dists[~np.eye(len(positions), dtype=bool)].min() > 1e-3


def test_split_poses_are_deterministic_per_seed() -> None:
    counts = {"train": 5, "val": 2, "test": 2}
    a, b, c = split_poses(counts, 4.0, 0), split_poses(counts, 4.0, 0), split_poses(counts, 4.0, 1)
    for split in counts:
        np.testing.assert_array_equal(a[split], b[split])
        assert not np.allclose(a[split], c[split])


def test_gt_mesh_and_meta(scene: Path) -> None:
    mesh = trimesh.load(scene / "gt_mesh.ply", force="mesh")
    assert mesh.is_watertight
    lo, hi = mesh.bounds
    assert np.max(hi - lo) == pytest.approx(1.8, abs=1e-6)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-6)
    meta = json.loads((scene / "scene_meta.json").read_text())
    assert meta["source"] == "procedural" and meta["extent"] == 1.8 and meta["image_size"] == SIZE
    assert meta["scale"] > 0 and len(meta["offset"]) == 3


def test_demo_mesh_parts_are_disjoint_and_watertight() -> None:
    mesh = procedural_demo_mesh()
    parts = mesh.split(only_watertight=False)
    assert len(parts) >= 3 and all(p.is_watertight for p in parts)
    # Disjoint: no vertex of one part lies inside another, so `contains` stays valid.
    for i, part in enumerate(parts):
        for j, other in enumerate(parts):
            if i != j:
                assert not other.contains(part.vertices).any()
    # Non-convex overall, and `contains` sees the inside of each part: points just
    # below each part's surface are inside, points just above are outside.
    assert mesh.volume < 0.9 * mesh.convex_hull.volume
    for part in parts:
        pts, faces = trimesh.sample.sample_surface(part, 200, seed=0)
        normals = part.face_normals[faces]
        assert mesh.contains(pts - 1e-3 * normals).all()
        assert not mesh.contains(pts + 1e-3 * normals).any()


# --------------------------------------------------------------------------- nerfstudio


def test_nerfstudio_blender_dataparser_reads_scene(scene: Path) -> None:
    torch = pytest.importorskip("torch")
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    outputs = BlenderDataParserConfig(data=scene).setup().get_dataparser_outputs("train")
    cameras = outputs.cameras
    assert cameras.shape[0] == COUNTS["train"] == len(outputs.image_filenames)
    assert int(cameras.width[0]) == SIZE and int(cameras.height[0]) == SIZE

    mesh = trimesh.load(scene / "gt_mesh.ply", force="mesh")
    centroid = torch.tensor(mesh.centroid, dtype=torch.float32)
    for i in range(COUNTS["train"]):
        # Project the centroid with nerfstudio's own intrinsics/extrinsics (OpenGL camera).
        c2w = cameras.camera_to_worlds[i]
        p_cam = c2w[:, :3].T @ (centroid - c2w[:, 3])
        assert p_cam[2] < 0  # in front of the camera
        u = cameras.fx[i, 0] * p_cam[0] / -p_cam[2] + cameras.cx[i, 0]
        v = -cameras.fy[i, 0] * p_cam[1] / -p_cam[2] + cameras.cy[i, 0]
        assert 0 <= u < SIZE and 0 <= v < SIZE

        # Stronger: nerfstudio's pixel rays hit the mesh exactly where our alpha says so.
        rays = cameras.generate_rays(camera_indices=i)
        origins = rays.origins.reshape(-1, 3).numpy().astype(float)
        dirs = rays.directions.reshape(-1, 3).numpy().astype(float)
        hit = mesh.ray.intersects_any(origins, dirs).reshape(SIZE, SIZE)
        alpha = np.asarray(Image.open(outputs.image_filenames[i]))[..., 3]
        solid = (alpha == 0) | (alpha == 255)  # ignore antialiased edge pixels
        agree = (hit == (alpha == 255))[solid].mean()
        assert agree > 0.99, f"view {i}: nerfstudio rays disagree with the image ({agree:.3f})"


# --------------------------------------------------------------------------- meshes


def test_load_and_normalise_bunny() -> None:
    if not BUNNY.is_file():
        pytest.skip(f"shared data not present at {BUNNY}")
    mesh = load_and_normalise_mesh(BUNNY)
    lo, hi = mesh.bounds
    assert np.max(hi - lo) == pytest.approx(1.8, abs=1e-6)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-6)
    assert np.max(np.abs(mesh.vertices)) == pytest.approx(0.9, abs=1e-6)
    raw = trimesh.load(BUNNY, force="mesh")
    meta = mesh.metadata["certsdf_normalisation"]
    np.testing.assert_allclose((raw.vertices + meta["offset"]) * meta["scale"], mesh.vertices, atol=1e-9)


def test_load_and_normalise_custom_extent(tmp_path: Path) -> None:
    box = trimesh.creation.box(extents=[2.0, 1.0, 0.5])
    box.apply_translation([5.0, -3.0, 1.0])
    path = tmp_path / "box.ply"
    box.export(path)
    mesh = load_and_normalise_mesh(path, extent=1.0)
    np.testing.assert_allclose(mesh.bounds, [[-0.5, -0.25, -0.125], [0.5, 0.25, 0.125]], atol=1e-9)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.obj"
    with pytest.raises(ValueError, match="nope.obj"):
        load_and_normalise_mesh(missing)
    empty = tmp_path / "empty.obj"
    empty.write_text("# no geometry\n")
    with pytest.raises(ValueError, match="empty.obj"):
        load_and_normalise_mesh(empty)


def test_full_cube_stays_in_view() -> None:
    # A cube filling [-0.9, 0.9]^3 has corners at 1.56 from the origin: the camera
    # distance must grow beyond 4 so that no view clips it.
    cube = trimesh.creation.box(extents=[1.8, 1.8, 1.8])
    radius = fitting_radius(cube)
    assert radius > 4.0
    c2w = look_at_origin(radius * np.array([1.0, -1.0, 0.0]) / np.sqrt(2))
    alpha = render_view(cube, Shader.for_mesh(cube), c2w, 32, CAMERA_ANGLE_X)[..., 3]
    border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    assert (alpha == 255).any() and (border == 0).all()


# --------------------------------------------------------------------------- CLI


def test_cli_bad_mesh_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.obj"
    proc = subprocess.run(
        [sys.executable, "-m", "certsdf_ns.data.scenes", str(tmp_path / "out"), "--mesh", str(missing)],
        capture_output=True, text=True, env=_cli_env(), timeout=120,
    )
    assert proc.returncode == 2
    assert "does_not_exist.obj" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_writes_small_scene(tmp_path: Path) -> None:
    out = tmp_path / "cli_scene"
    args = ["--image-size", "16", "--n-train", "2", "--n-val", "1", "--n-test", "1", "--seed", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "certsdf_ns.data.scenes", str(out), *args],
        capture_output=True, text=True, env=_cli_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "4 images" in proc.stdout
    assert len(_frames(out, "train")["frames"]) == 2
    assert Image.open(out / "test/r_0.png").size == (16, 16)
