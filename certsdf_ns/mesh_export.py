"""`certsdf-export`: the zero level set of a trained model's certified SDF, as a mesh.

    certsdf-export --load-config outputs/.../config.yml --output-dir DIR
                   [--resolution 256] [--upsample 1] [--obj] [--vertex-colours]
                   [--sdf-grid [--safety-margin-voxels 1.0]]

The certified SDF lives on the occupancy grid's nodes and is trilinear in between, so the
mesh is PyMCubes' marching cubes (level 0) on a lattice over the scene box:

* ``--resolution N`` (default 256): N samples per axis, each the trilinear value of the node
  SDF; because the lattice is axis-aligned this is evaluated separably (three 1-D linear
  interpolations), the same numbers as ``field.geometry.sdf(x)`` in a fraction of the time;
* ``--resolution 0 --upsample K``: the node grid refined K times per cell, (R−1)·K+1 samples
  per axis; K = 1 meshes the certified node SDF itself, with no interpolation.

The SDF is positive outside, so faces are oriented outward (PyMCubes' are inward for that
sign convention and are flipped). Vertices are mapped to world coordinates and then back to
the scene's original frame by undoing nerfstudio's dataparser transform and scale, read
from ``dataparser_transforms.json`` next to ``config.yml`` (identity for Blender scenes; for
nerfstudio-format scenes the poses were re-oriented, centred and scaled); ``--frame
nerfstudio`` keeps the model's frame. ``--vertex-colours`` stores the colour field at each
vertex seen head-on from outside: view direction = −n, with n the certified SDF's outward
normal (the colour of a camera ray hitting the surface along its normal).

Writes ``DIR/certsdf_mesh.ply`` (and ``.obj`` with ``--obj``) with trimesh; ``--sdf-grid`` also
writes ``DIR/certsdf_sdf.npz``, the node SDF minus a safety margin (see :mod:`certsdf_ns.query`). Bad input exits
with code 2 and one message, a checkpoint without a surface exits with code 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh
import tyro
from jaxtyping import Float
from torch import Tensor

from certsdf_ns.certified import CertifiedSDFGrid

MESH_NAME = "certsdf_mesh"
SDF_GRID_NAME = "certsdf_sdf.npz"


class NoSurfaceError(RuntimeError):
    """The certified SDF does not change sign in the box: there is nothing to mesh."""


@dataclass
class MeshExportConfig:
    """`certsdf-export`: mesh the certified SDF of a trained certsdf run."""

    load_config: Path
    """config.yml of the run (as written by ns-train)."""
    output_dir: Path
    """Folder for certsdf_mesh.ply (and .obj)."""
    resolution: int = 256
    """Marching-cubes samples per axis over the scene box (trilinear in the node SDF); 0 = the
    occupancy grid's own nodes, refined by --upsample."""
    upsample: int = 1
    """With --resolution 0: samples per grid cell per axis; 1 meshes the node SDF itself."""
    obj: bool = False
    """Also write certsdf_mesh.obj."""
    vertex_colours: bool = False
    """Store the colour field at each vertex, viewed along the inward normal."""
    frame: Literal["original", "nerfstudio"] = "original"
    """'original' undoes the dataparser transform and scale (the scene's own frame);
    'nerfstudio' keeps the model's world frame."""
    sdf_grid: bool = False
    """Also write DIR/certsdf_sdf.npz: the certified node SDF minus the safety margin, with its box,
    σ, ε, voxel size and the transform to the chosen frame (see certsdf_ns.query; load it with
    `CertifiedSDF.from_npz`)."""
    safety_margin_voxels: float = 1.0
    """With --sdf-grid: margin subtracted from the stored SDF, in voxels of the occupancy grid
    (certsdf_ns.query.DEFAULT_MARGIN_VOXELS; 0 stores the raw certified SDF)."""


# --------------------------------------------------------------------------- extraction


def check_lattice_args(resolution: int, upsample: int) -> None:
    """ValueError unless resolution is 0 or >= 2, upsample >= 1, and upsample is only used with 0."""
    if resolution < 0 or resolution == 1 or upsample < 1:
        raise ValueError(f"need --resolution 0 or >= 2 and --upsample >= 1, got {resolution} and {upsample}")
    if resolution > 0 and upsample != 1:
        raise ValueError("--upsample refines the node grid and applies to --resolution 0 only")


def lattice_coordinates(resolution: int, upsample: int, grid_resolution: Sequence[int]) -> list[Tensor]:
    """Per-axis sample positions in node-index units (0 … R−1) of the occupancy grid."""
    check_lattice_args(resolution, upsample)
    counts = [(r - 1) * upsample + 1 if resolution == 0 else resolution for r in grid_resolution]
    return [torch.linspace(0.0, float(r - 1), n, dtype=torch.float64) for r, n in zip(grid_resolution, counts)]


def interpolation_matrix(u: Tensor, num_nodes: int) -> Float[Tensor, "M R"]:
    """Linear interpolation along one axis as a matrix: row m holds 1 − t and t at the two
    nodes around the fractional node index u[m]."""
    i0 = u.floor().long().clamp(0, num_nodes - 2)
    t = (u - i0).float()
    rows = torch.arange(len(u))
    w = torch.zeros(len(u), num_nodes)
    w[rows, i0] = 1.0 - t
    w[rows, i0 + 1] = t
    return w


@torch.no_grad()
def sample_sdf_lattice(geometry: CertifiedSDFGrid, coords: Sequence[Tensor]) -> Float[Tensor, "X Y Z"]:
    """Trilinear SDF on the lattice coords[0] × coords[1] × coords[2] (node-index units).

    Trilinear interpolation is a tensor product of 1-D linear interpolations, so on an
    axis-aligned lattice it is three matrix products (as in the smoothing), ~20x faster on
    CPU than grid_sample per point; the values are those of ``geometry.sdf(x)``.
    """
    grid = geometry.sdf_grid().detach().cpu().float()
    wx, wy, wz = (interpolation_matrix(u, n) for u, n in zip(coords, grid.shape))
    nx, ny, nz = grid.shape
    volume = (wx @ grid.reshape(nx, ny * nz)).reshape(-1, ny, nz)
    volume = torch.matmul(wy, volume)  # batched over x, acts on y
    return torch.matmul(volume, wz.transpose(0, 1))  # acts on z


@torch.no_grad()
def extract_mesh(geometry: CertifiedSDFGrid, resolution: int = 256, upsample: int = 1) -> trimesh.Trimesh:
    """Outward-oriented mesh of {sdf = 0} in the grid's world frame; NoSurfaceError if empty."""
    import mcubes

    coords = lattice_coordinates(resolution, upsample, geometry.resolution)
    sdf = sample_sdf_lattice(geometry, coords).numpy()
    lo, hi = float(sdf.min()), float(sdf.max())
    if lo >= 0.0 or hi <= 0.0:
        sign = "positive" if lo >= 0.0 else "negative"
        where = "the occupancy grid is empty (untrained, or nothing was fitted)" if lo >= 0 else "the whole box is occupied"
        raise NoSurfaceError(
            f"no surface: the certified SDF is {sign} everywhere in the scene box "
            f"(min {lo:.4g}, max {hi:.4g} over {'x'.join(str(len(c)) for c in coords)} samples): {where}."
        )
    vertices, faces = mcubes.marching_cubes(sdf, 0.0)
    # Index space -> world: node i sits at aabb_min + i * voxel; lattice index j at coords[j].
    aabb = geometry.aabb.detach().cpu().double().numpy()
    steps = np.array([float(c[1] - c[0]) for c in coords]) * geometry.voxel_size.double().numpy()
    vertices = aabb[0] + vertices * steps
    # PyMCubes orients faces towards larger values; the SDF grows outwards, so flip them.
    return trimesh.Trimesh(vertices, faces[:, ::-1], process=False)


@torch.no_grad()
def vertex_colours(field, mesh: trimesh.Trimesh, chunk: int = 1 << 16) -> Float[np.ndarray, "V 3"]:
    """Colour field at the vertices seen from outside along the normal (view direction −n)."""
    x = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=field.aabb.device)
    out = []
    for part in torch.split(x, chunk):
        normals = field.geometry.normals(part)
        out.append(field.colour_at(part, -normals).clamp(0.0, 1.0).cpu())
    return torch.cat(out).numpy()


def write_sdf_grid(geometry: CertifiedSDFGrid, path: Path, margin_voxels: float,
                   transform: Optional[np.ndarray] = None, scale: float = 1.0) -> Path:  # fmt: skip
    """The node SDF minus `margin_voxels` voxels as an .npz for planners (format: certsdf_ns.query)."""
    from certsdf_ns.query import CertifiedSDF

    if not margin_voxels >= 0.0:
        raise UsageError(f"--safety-margin-voxels must be >= 0, got {margin_voxels}")
    sdf = CertifiedSDF.from_grid(geometry, safety_margin=0.0, transform=transform, scale=scale)
    sdf.safety_margin = margin_voxels * sdf.voxel
    return sdf.save_npz(path)


# --------------------------------------------------------------------------- frames


def read_dataparser_transform(run_dir: Path) -> Tuple[np.ndarray, float]:
    """(3×4 transform, scale) that nerfstudio applied to the poses: x_ns = scale·(T·[x; 1])."""
    path = run_dir / "dataparser_transforms.json"
    data = json.loads(path.read_text())
    transform = np.asarray(data["transform"], dtype=np.float64)
    if transform.shape != (3, 4) or not np.isfinite(transform).all():
        raise ValueError(f"{path}: 'transform' must be a finite 3x4 matrix, got shape {transform.shape}")
    scale = float(data["scale"])
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"{path}: 'scale' must be a positive number, got {data['scale']}")
    return transform, scale


def to_original_frame(mesh: trimesh.Trimesh, transform: np.ndarray, scale: float) -> trimesh.Trimesh:
    """Undo x_ns = scale·(T·[x; 1]): x = T⁻¹·[x_ns / scale; 1] (what ns-export's
    --save-world-frame does for point clouds); faces are flipped if T⁻¹ reflects."""
    full = np.vstack([transform, [0.0, 0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)
    vertices = mesh.vertices / scale @ inverse[:3, :3].T + inverse[:3, 3]
    faces = mesh.faces if np.linalg.det(inverse[:3, :3]) > 0 else mesh.faces[:, ::-1]
    colours = mesh.visual.vertex_colors if mesh.visual.kind == "vertex" else None
    return trimesh.Trimesh(vertices, faces, vertex_colors=colours, process=False)


# --------------------------------------------------------------------------- CLI


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


def _load_pipeline(config_path: Path):
    """eval_setup without loading images, tolerant of run folders moved after training."""
    import yaml

    if not config_path.is_file():
        raise UsageError(f"--load-config {config_path}: no such file (pass the config.yml of an ns-train run)")
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except yaml.YAMLError as exc:
        raise UsageError(f"--load-config {config_path}: not a readable YAML config ({exc.__class__.__name__})") from exc
    if getattr(config, "method_name", None) != "certsdf":
        found = getattr(config, "method_name", type(config).__name__)
        raise UsageError(f"{config_path}: method is {found!r}, certsdf-export reads certsdf runs only")
    data = Path(config.pipeline.datamanager.dataparser.data)
    if not data.exists():
        raise UsageError(f"{config_path}: the scene {data} it was trained on is missing (its scene box is needed)")
    run_dir = config_path.resolve().parent
    from nerfstudio.utils.eval_utils import eval_setup  # slow (discovers every method): after the checks

    def checkpoints_next_to_config(cfg):
        # ns-train records absolute output paths, so a copied or moved run folder would load the
        # checkpoints of the original run (or none). The folder of config.yml wins when it has them.
        if (run_dir / cfg.relative_model_dir).is_dir():
            cfg.get_checkpoint_dir = lambda: run_dir / cfg.relative_model_dir
        return cfg

    _, pipeline, checkpoint, step = eval_setup(
        config_path, test_mode="inference", update_config_callback=checkpoints_next_to_config
    )
    return pipeline, checkpoint, step


def export(cfg: MeshExportConfig) -> dict:
    """Run the export described by `cfg`; returns a summary (also printed by the CLI)."""
    try:
        check_lattice_args(cfg.resolution, cfg.upsample)  # before the slow load
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    timings = {}
    t0 = time.perf_counter()
    pipeline, checkpoint, step = _load_pipeline(cfg.load_config)
    field = pipeline.model.field
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mesh = extract_mesh(field.geometry, cfg.resolution, cfg.upsample)
    timings["marching cubes"] = time.perf_counter() - t0
    if cfg.vertex_colours:
        t0 = time.perf_counter()
        rgb = vertex_colours(field, mesh)
        mesh.visual.vertex_colors = np.concatenate([rgb * 255.0, np.full((len(rgb), 1), 255.0)], 1).round().astype(np.uint8)
        timings["colours"] = time.perf_counter() - t0
    frame = "nerfstudio world frame"
    transform, scale = None, 1.0
    if cfg.frame == "original":
        run_dir = cfg.load_config.resolve().parent
        try:
            transform, scale = read_dataparser_transform(run_dir)
        except FileNotFoundError as exc:
            raise UsageError(f"{exc.filename} is missing: use --frame nerfstudio to keep the model's frame") from exc
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{run_dir / 'dataparser_transforms.json'}: unreadable ({exc})") from exc
        mesh = to_original_frame(mesh, transform, scale)
        frame = f"original scene frame (dataparser transform undone, scale {scale:.6g})"

    t0 = time.perf_counter()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    paths = [cfg.output_dir / f"{MESH_NAME}.ply"] + ([cfg.output_dir / f"{MESH_NAME}.obj"] if cfg.obj else [])
    for path in paths:
        mesh.export(path)
    if cfg.sdf_grid:
        paths.append(write_sdf_grid(field.geometry, cfg.output_dir / SDF_GRID_NAME, cfg.safety_margin_voxels, transform, scale))
    timings["write"] = time.perf_counter() - t0
    return {
        "checkpoint": str(checkpoint),
        "step": step,
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "watertight": bool(mesh.is_watertight),
        "frame": frame,
        "outputs": [str(p) for p in paths],
        "timings_s": timings,
    }


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from nerfstudio.utils.rich_utils import CONSOLE

    table = Table(title="certsdf-export", show_header=False)
    table.add_row("checkpoint", f"{summary['checkpoint']} (step {summary['step']})")
    table.add_row("vertices / faces", f"{summary['vertices']} / {summary['faces']}")
    table.add_row("watertight", str(summary["watertight"]))
    table.add_row("frame", summary["frame"])
    table.add_row("time", ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings_s"].items()))
    for path in summary["outputs"]:
        table.add_row("wrote", path)
    CONSOLE.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `certsdf-export`."""
    cfg = tyro.cli(MeshExportConfig, args=argv)
    try:
        summary = export(cfg)
    except UsageError as exc:
        print(f"certsdf-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except NoSurfaceError as exc:
        print(f"certsdf-export: {exc}", file=sys.stderr)
        sys.exit(1)
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    main()
