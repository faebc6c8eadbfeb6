"""Offline synthetic scenes in Blender (NeRF-synthetic) format with a ground-truth mesh.

A scene is rendered on the CPU by ray casting a triangle mesh with trimesh (embree is
used automatically when ``embreex`` is importable) and is written exactly like the
NeRF-synthetic data set, so that nerfstudio's ``blender-data`` dataparser reads it:

    OUT_DIR/
      transforms_{train,val,test}.json   camera_angle_x + frames (file_path, transform_matrix)
      {train,val,test}/r_<i>.png         RGBA, background alpha 0
      gt_mesh.ply                        the rendered mesh, in the cameras' world frame
      scene_meta.json                    how the source mesh was normalised

Every mesh is normalised so that its bounding box is centred at the origin and its
longest side is ``extent`` (1.8): the object spans [-0.9, 0.9] on its longest axis, and
``v_scene = (v_source + offset) * scale``.

Cameras follow the OpenGL/Blender convention (camera looks down its -z axis, +y is up,
+x is right; the world is z-up) and sit on a sphere of radius 4 around the origin.

Command line: ``certsdf-make-scene OUT_DIR [--mesh PATH] [--image-size 64] ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from certsdf_ns.output_paths import check_writable_dir

# Same horizontal field of view as the NeRF-synthetic "lego" scene.
CAMERA_ANGLE_X = 0.6911112070083618
CAMERA_RADIUS = 4.0
DEFAULT_EXTENT = 1.8
# Elevation band of the cameras: mostly the upper hemisphere, some views from below.
ELEVATION_RANGE_DEG = (-30.0, 80.0)
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# Fixed world-space light (z-up world): from above, slightly to the side.
LIGHT_DIRECTION = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
AMBIENT = 0.3
# Saturated colours; each connected part of the mesh uses a different pair.
PALETTE = np.array(
    [
        [0.90, 0.15, 0.12],  # red
        [0.10, 0.45, 0.95],  # blue
        [0.98, 0.80, 0.08],  # yellow
        [0.12, 0.75, 0.25],  # green
        [0.85, 0.20, 0.85],  # magenta
        [0.05, 0.80, 0.85],  # cyan
        [1.00, 0.50, 0.05],  # orange
        [0.50, 0.25, 0.90],  # violet
    ]
)
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- meshes


def read_mesh(path: str | Path) -> trimesh.Trimesh:
    """Load a mesh file (OBJ, PLY, ...) as one ``Trimesh``.

    Raises ``ValueError`` naming the file when it is missing, unreadable or has no
    triangles, so that command-line tools can report one clear line instead of a
    traceback from deep inside a loader.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mesh file not found: {path}")
    try:
        # force="mesh" flattens multi-object scenes (e.g. OBJ groups) into one mesh.
        mesh = trimesh.load(path, force="mesh")
    except Exception as exc:  # loaders raise many different types; report them alike
        raise ValueError(f"cannot read mesh file {path}: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"mesh file {path} contains no triangles")
    return mesh


def _normalisation(mesh: trimesh.Trimesh, extent: float) -> tuple[float, np.ndarray]:
    """Scale and offset mapping ``mesh`` to a bbox centred at 0 with longest side ``extent``."""
    lo, hi = mesh.bounds
    longest = float(np.max(hi - lo))
    if not np.isfinite(longest) or longest <= 0.0:
        raise ValueError("mesh has a degenerate (zero-size) bounding box")
    return extent / longest, -(lo + hi) / 2.0


def _normalise(mesh: trimesh.Trimesh, extent: float, source: str) -> trimesh.Trimesh:
    """Return a normalised copy of ``mesh``; the mapping is kept in ``mesh.metadata``.

    The metadata composes with any earlier normalisation, so ``scene_meta.json`` always
    maps the *original source file* to the scene frame.
    """
    scale, offset = _normalisation(mesh, extent)
    out = mesh.copy()
    out.vertices = (out.vertices + offset) * scale
    prev = mesh.metadata.get("certsdf_normalisation")
    if prev is not None:
        # v_scene = ((v_src + o1) * s1 + o2) * s2 = (v_src + o1 + o2 / s1) * (s1 * s2)
        offset = np.asarray(prev["offset"]) + offset / prev["scale"]
        scale = prev["scale"] * scale
        source = prev["source"]
    out.metadata["certsdf_normalisation"] = {
        "source": source,
        "extent": float(extent),
        "scale": float(scale),
        "offset": [float(x) for x in offset],
    }
    return out


def load_and_normalise_mesh(path: str | Path, extent: float = DEFAULT_EXTENT) -> trimesh.Trimesh:
    """Load an OBJ/PLY mesh, centre its bounding box at the origin and scale it so that
    its longest bounding-box side equals ``extent``.

    Raises ``ValueError`` naming the file if it is missing, unreadable or empty.
    """
    mesh = read_mesh(path)
    try:
        return _normalise(mesh, extent, source=str(path))
    except ValueError as exc:
        raise ValueError(f"mesh file {path}: {exc}") from exc


def procedural_demo_mesh() -> trimesh.Trimesh:
    """A non-convex demo object: a sphere, an upright torus and a tilted box.

    The parts are disjoint and each is watertight, so their union is watertight and
    ``contains`` (inside/outside by ray parity) is well defined. The result is
    already normalised (longest bbox side 1.8, centred at the origin).
    """
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    sphere.apply_translation([-0.75, 0.0, -0.15])

    torus = trimesh.creation.torus(
        major_radius=0.42, minor_radius=0.13, major_sections=64, minor_sections=24
    )
    # Stand the torus up (its axis along y) so side views see through the hole.
    torus.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [1, 0, 0]))
    torus.apply_translation([0.45, 0.0, 0.38])  # spans z in [-0.17, 0.93]

    box = trimesh.creation.box(extents=[0.45, 0.45, 0.5])
    box.apply_transform(trimesh.transformations.rotation_matrix(math.radians(30), [0, 0, 1]))
    box.apply_translation([0.45, 0.05, -0.5])  # spans z in [-0.75, -0.25]: below the torus

    parts = trimesh.util.concatenate([sphere, torus, box])
    parts.metadata = {}  # drop the primitives' creation parameters merged in by concatenate
    return _normalise(parts, DEFAULT_EXTENT, source="procedural")


# --------------------------------------------------------------------------- cameras


def look_at_origin(position: np.ndarray) -> np.ndarray:
    """Camera-to-world 4x4 (OpenGL convention) for a camera at ``position`` looking at 0.

    The camera's +z axis points away from the target (it looks down -z) and +x is kept
    horizontal in the z-up world, so images are upright.
    """
    z_axis = position / np.linalg.norm(position)
    x_axis = np.cross([0.0, 0.0, 1.0], z_axis)
    x_axis /= np.linalg.norm(x_axis)  # safe: elevations stay below 90 degrees
    y_axis = np.cross(z_axis, x_axis)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x_axis, y_axis, z_axis, position
    return c2w


def camera_positions(n: int, radius: float, azimuth_offset: float) -> np.ndarray:
    """``n`` points of a Fibonacci lattice restricted to the elevation band.

    Uniform in sin(elevation) gives equal-area coverage of the band; the golden-angle
    azimuth step spreads consecutive views around the object.
    """
    lo, hi = (math.sin(math.radians(e)) for e in ELEVATION_RANGE_DEG)
    i = np.arange(n) + 0.5
    sin_elev = lo + (hi - lo) * i / max(n, 1)
    cos_elev = np.sqrt(1.0 - sin_elev**2)
    azimuth = azimuth_offset + GOLDEN_ANGLE * np.arange(n)
    unit = np.stack(
        [cos_elev * np.cos(azimuth), cos_elev * np.sin(azimuth), sin_elev], axis=-1
    )
    return radius * unit


def split_poses(n_per_split: dict[str, int], radius: float, seed: int) -> dict[str, np.ndarray]:
    """Camera-to-world matrices per split; each split is its own lattice with a random
    azimuthal rotation so train, val and test views sit at different positions."""
    rng = np.random.default_rng(seed)
    poses = {}
    for split, n in n_per_split.items():
        offset = rng.uniform(0.0, 2.0 * math.pi)
        positions = camera_positions(n, radius, offset)
        poses[split] = np.stack([look_at_origin(p) for p in positions])
    return poses


def fitting_radius(mesh: trimesh.Trimesh, fov_x: float = CAMERA_ANGLE_X) -> float:
    """Camera distance: 4.0, or more if the object's bounding sphere would not fit.

    A sphere of radius r seen from distance d subtends a half-angle asin(r/d); keeping
    it below half the (square) field of view guarantees the whole object is visible
    from every direction. 3% margin keeps antialiased edges off the image border.
    """
    r = float(np.max(np.linalg.norm(mesh.vertices, axis=1)))
    return max(CAMERA_RADIUS, 1.03 * r / math.sin(fov_x / 2.0))


# --------------------------------------------------------------------------- rendering


@dataclass
class Shader:
    """Per-face data for the procedural texture and Lambertian shading."""

    face_normals: np.ndarray  # (F, 3)
    face_part: np.ndarray  # (F,) connected-component id
    v0: np.ndarray  # (F, 3) first vertex, for the exact ray-plane hit distance

    @classmethod
    def for_mesh(cls, mesh: trimesh.Trimesh) -> Shader:
        part = trimesh.graph.connected_component_labels(
            mesh.face_adjacency, node_count=len(mesh.faces)
        )
        return cls(np.asarray(mesh.face_normals), part, mesh.vertices[mesh.faces[:, 0]])

    def albedo(self, points: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """3D checkerboard in world coordinates, two saturated colours per part.

        A solid (3D) texture needs no UVs and is consistent across views, which gives
        photometric methods something to match; colours differ per part.
        """
        cell = np.floor(points / 0.22).astype(np.int64).sum(axis=1) & 1
        part = self.face_part[faces]
        colour = PALETTE[(2 * part + cell) % len(PALETTE)]
        # Thin darker stripes along z add high-frequency detail inside each cell.
        stripe = (np.floor(points[:, 2] / 0.05).astype(np.int64) % 3 == 0)
        return colour * np.where(stripe, 0.75, 1.0)[:, None]

    def shade(self, origins: np.ndarray, dirs: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Colour of the hits of rays ``(origins, dirs)`` on ``faces``."""
        n = self.face_normals[faces]
        # Exact hit point from the ray-plane intersection of the hit triangle.
        denom = np.einsum("ij,ij->i", n, dirs)
        t = np.einsum("ij,ij->i", n, self.v0[faces] - origins) / np.where(denom == 0, 1e-12, denom)
        points = origins + t[:, None] * dirs
        # Orient the normal towards the camera so back faces are lit like front faces.
        n = np.where((denom > 0)[:, None], -n, n)
        lambert = np.clip(n @ LIGHT_DIRECTION, 0.0, None)
        return self.albedo(points, faces) * (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]


def pixel_rays(c2w: np.ndarray, size: int, fov_x: float, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space ray directions, (size*ss)^2 of them, plus the camera origin.

    Pixel (row i, col j) covers [j, j+1] x [i, i+1]; sub-samples sit at the centres of
    an ss x ss grid inside it, matching nerfstudio's pixel-centre convention for ss=1.
    """
    focal = 0.5 * size / math.tan(0.5 * fov_x)
    sub = (np.arange(size * supersample) + 0.5) / supersample  # pixel coordinates
    u, v = np.meshgrid(sub, sub, indexing="xy")
    dirs_cam = np.stack([(u - size / 2) / focal, -(v - size / 2) / focal, -np.ones_like(u)], -1)
    dirs = dirs_cam.reshape(-1, 3) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return c2w[:3, 3], dirs


def render_view(
    mesh: trimesh.Trimesh,
    shader: Shader,
    c2w: np.ndarray,
    size: int,
    fov_x: float = CAMERA_ANGLE_X,
    supersample: int = 2,
    background: str = "none",
) -> np.ndarray:
    """Render one RGBA uint8 image (straight, non-premultiplied alpha); with ``background="room"`` an
    opaque image of the object inside a textured room (RGB, alpha 255 everywhere)."""
    origin, dirs = pixel_rays(c2w, size, fov_x, supersample)
    # Only rays that meet the bounding sphere can hit: skip the rest of the background.
    radius = np.max(np.linalg.norm(mesh.vertices, axis=1))
    along = -(dirs @ origin)
    near = (origin @ origin - along**2) <= radius**2
    rgb = np.zeros((len(dirs), 3))
    hit = np.zeros(len(dirs), dtype=bool)
    idx = np.flatnonzero(near)
    if len(idx):
        origins = np.broadcast_to(origin, (len(idx), 3))
        faces = mesh.ray.intersects_first(origins, dirs[idx])
        ok = faces >= 0
        hit[idx[ok]] = True
        rgb[idx[ok]] = shader.shade(origins[ok], dirs[idx[ok]], faces[ok])
    if background == "room":
        rgb[~hit] = room_colour(origin, dirs[~hit])
        hit = np.ones_like(hit)
    return _resolve(rgb, hit, size, supersample)


ROOM_HALF_SIZE = 6.0
"""Half edge of the textured room around the object (`background="room"`): its walls lie beyond
every camera (radius 4) and far outside the object's region, and move with parallax between views."""
ROOM_CELL = 0.75
ROOM_PALETTE = np.array([[0.95, 0.92, 0.85], [0.35, 0.30, 0.28], [0.55, 0.70, 0.80], [0.80, 0.55, 0.35]])


def room_colour(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Colour where rays from inside the room meet its walls: a checkerboard of ROOM_CELL squares
    in two colours per wall (a real background: textured, not plain, and not infinitely far)."""
    with np.errstate(divide="ignore"):
        t_axes = (np.sign(dirs) * ROOM_HALF_SIZE - origin) / dirs  # distance to the wall ahead on each axis
    t_axes[~np.isfinite(t_axes)] = np.inf
    axis = np.argmin(t_axes, axis=1)
    t = t_axes[np.arange(len(dirs)), axis]
    points = origin + t[:, None] * dirs
    cell = np.floor(points / ROOM_CELL).astype(np.int64).sum(axis=1) & 1
    wall = 2 * axis + (dirs[np.arange(len(dirs)), axis] > 0)  # which of the six walls
    colour = ROOM_PALETTE[(wall + 2 * cell) % len(ROOM_PALETTE)]
    return colour * (0.8 + 0.04 * wall)[:, None]


def _resolve(rgb: np.ndarray, hit: np.ndarray, size: int, ss: int) -> np.ndarray:
    """Average ss x ss sub-samples: alpha = hit fraction, colour = mean over hits."""
    rgb = rgb.reshape(size, ss, size, ss, 3).sum(axis=(1, 3))
    count = hit.reshape(size, ss, size, ss).sum(axis=(1, 3))
    colour = rgb / np.maximum(count, 1)[..., None]
    alpha = count / (ss * ss)
    rgba = np.concatenate([colour, alpha[..., None]], axis=-1)
    return np.round(np.clip(rgba, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _write_split(out_dir: Path, split: str, poses: np.ndarray, render, opaque: bool = False) -> None:
    """One split's images (RGBA, or RGB when ``opaque``) and its transforms file."""
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, c2w in enumerate(poses):
        rgba = render(c2w)
        image = Image.fromarray(rgba[..., :3], mode="RGB") if opaque else Image.fromarray(rgba, mode="RGBA")
        image.save(out_dir / split / f"r_{i}.png")
        frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
    meta = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
    (out_dir / f"transforms_{split}.json").write_text(json.dumps(meta, indent=2))


def make_scene(
    out_dir: str | Path,
    mesh: trimesh.Trimesh | None = None,
    image_size: int = 64,
    n_train: int = 60,
    n_val: int = 10,
    n_test: int = 10,
    seed: int = 0,
    background: str = "none",
) -> Path:
    """Render ``mesh`` (default: ``procedural_demo_mesh()``) into a Blender-format scene.

    The mesh is (re-)normalised to the standard extent, which is a no-op for meshes
    from ``load_and_normalise_mesh``/``procedural_demo_mesh``. ``background``: "none" (RGBA,
    transparent background, as NeRF-synthetic) or "room" (RGB photographs of the object inside a
    textured room: a real capture with known geometry; ``gt_mesh.ply`` is the object alone).
    Returns ``out_dir``.
    """
    if background not in ("none", "room"):
        raise ValueError(f"background must be 'none' or 'room', got {background!r}")
    if image_size < 1 or min(n_train, n_val, n_test) < 1:
        # nerfstudio reads the first image of a split for its size, so none may be empty.
        raise ValueError("image_size and the number of views of every split must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_mesh = procedural_demo_mesh() if mesh is None else mesh
    mesh = _normalise(source_mesh, DEFAULT_EXTENT, source="in-memory mesh")
    shader = Shader.for_mesh(mesh)
    radius = fitting_radius(mesh)
    poses = split_poses({"train": n_train, "val": n_val, "test": n_test}, radius, seed)

    def render(c2w: np.ndarray) -> np.ndarray:
        return render_view(mesh, shader, c2w, image_size, background=background)

    for split in SPLITS:
        _write_split(out_dir, split, poses[split], render, opaque=background == "room")
    mesh.export(out_dir / "gt_mesh.ply")
    meta = {
        **mesh.metadata["certsdf_normalisation"],
        "image_size": image_size,
        "camera_radius": radius,
        "camera_angle_x": CAMERA_ANGLE_X,
        "n_images": {split: len(poses[split]) for split in SPLITS},
        "seed": seed,
        "background": background,
    }
    (out_dir / "scene_meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="certsdf-make-scene",
        description="Render a mesh into a NeRF-synthetic (Blender format) scene with gt_mesh.ply.",
    )
    p.add_argument("out_dir", type=Path, help="directory to write the scene to")
    p.add_argument("--mesh", type=Path, default=None, help="OBJ/PLY mesh (default: procedural demo object)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-val", type=int, default=10)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", choices=("none", "room"), default="none",
                   help="none: RGBA on a transparent background; room: RGB photos inside a textured room")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``certsdf-make-scene``; bad input exits with code 2 and one line."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        check_writable_dir(args.out_dir, "out_dir")  # before rendering
        mesh = load_and_normalise_mesh(args.mesh) if args.mesh is not None else None
        out = make_scene(
            args.out_dir, mesh, args.image_size, args.n_train, args.n_val, args.n_test, args.seed, args.background
        )
    except (ValueError, OSError) as exc:
        print(f"certsdf-make-scene: error: {exc}", file=sys.stderr)
        sys.exit(2)
    n = args.n_train + args.n_val + args.n_test
    print(
        f"Wrote scene to {out}: {n} images ({args.n_train} train / {args.n_val} val / "
        f"{args.n_test} test) at {args.image_size}x{args.image_size}, ground truth "
        f"{out / 'gt_mesh.ply'} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    main()
