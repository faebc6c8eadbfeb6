"""`certsdf-export`: the zero level set of a trained model's certified SDF, as a mesh.

    certsdf-export --load-config outputs/.../config.yml --output-dir DIR
                   [--resolution 256] [--upsample 1] [--obj] [--vertex-colours]
                   [--sdf-grid [--safety-margin-voxels 1.0]] [--keep-unobserved]

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

On a real capture the mesh holds only *observed* space (:mod:`certsdf_ns.export.observed`): the
occupancy is restricted to the space the training cameras constrain (seen, or hidden at most the
prior's fill depth behind a seen surface), so what no camera sees (the fill behind the object, under
the table, up to the region's ball) forms no surface, and the faces where the region's sphere cuts
the scene are dropped; the summary says how much of the full zero set each removed.
``--keep-unobserved`` meshes the full zero set. Synthetic scenes are meshed whole.

Writes ``DIR/certsdf_mesh.ply`` (and ``.obj`` with ``--obj``) with trimesh; ``--sdf-grid`` also
writes ``DIR/certsdf_sdf.npz``, the node SDF minus a safety margin, and the observed-space node mask
(see :mod:`certsdf_ns.export.query`). Bad input exits
with code 2 and one message, a checkpoint without a surface exits with code 1.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import trimesh
import tyro
from jaxtyping import Float
from rich.table import Table

from certsdf_ns.console import CONSOLE, silence_known_noise
from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.errors import CertSDFInputError
from certsdf_ns.export.mesh import NoSurfaceError, check_lattice_args, lattice_counts
from certsdf_ns.export.observed import ObservedSpace, export_mesh
from certsdf_ns.export.query import CertifiedSDF
from certsdf_ns.output_paths import OutputLocationError, check_writable_dir
from certsdf_ns.export.run import load_run, read_run_config

MESH_NAME = "certsdf_mesh"
EXPORT_BYTES_PER_SAMPLE = 16
"""Peak bytes per lattice sample: two float32 volumes of the interpolation and marching cubes' float64 copy."""
SDF_GRID_NAME = "certsdf_sdf.npz"


@dataclass
class MeshExportConfig:
    """`certsdf-export`: mesh the certified SDF of a trained certsdf run."""

    load_config: Path
    """config.yml of the run (as written by ns-train)."""
    output_dir: Path
    """Folder for certsdf_mesh.ply (and .obj)."""
    resolution: int = 256
    """Marching-cubes samples per axis over the scene box; 0: the occupancy grid's own nodes, refined by --upsample."""
    upsample: int = 1
    """With --resolution 0: samples per grid cell per axis; 1 meshes the node SDF itself."""
    obj: bool = False
    """Also write certsdf_mesh.obj."""
    vertex_colours: bool = False
    """Store the colour field at each vertex, viewed along the inward normal."""
    frame: Literal["original", "nerfstudio"] = "original"
    """'original': the scene's own frame (the dataparser's transform and scale undone); 'nerfstudio': the model's."""
    sdf_grid: bool = False
    """Also write certsdf_sdf.npz: the certified node SDF minus the safety margin (load with CertifiedSDF.from_npz)."""
    safety_margin_voxels: float = 1.0
    """With --sdf-grid: margin subtracted from the stored SDF, in voxels of the occupancy grid; 0: the raw SDF."""
    keep_unobserved: bool = False
    """Mesh the full zero set; by default a real capture's mesh holds only the space its training cameras observed."""


# --------------------------------------------------------------------------- extraction


@torch.no_grad()
def vertex_colours(field, mesh: trimesh.Trimesh, geometry: Optional[CertifiedSDFGrid] = None,
                   chunk: int = 1 << 16) -> Float[np.ndarray, "V 3"]:  # fmt: skip
    """Colour field at the vertices seen from outside along the normal (view direction −n) of the grid the
    mesh came from (`geometry`; the field's own by default)."""
    geometry = field.geometry if geometry is None else geometry
    x = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=field.aabb.device)
    out = []
    for part in torch.split(x, chunk):
        normals = geometry.normals(part.to(geometry.aabb.device)).to(part.device)
        out.append(field.colour_at(part, -normals).clamp(0.0, 1.0).cpu())
    return torch.cat(out).numpy()


def write_sdf_grid(geometry: CertifiedSDFGrid, path: Path, margin_voxels: float, transform: Optional[np.ndarray] = None,
                   scale: float = 1.0, observed: Optional[ObservedSpace] = None) -> Path:  # fmt: skip
    """The node SDF minus `margin_voxels` voxels, and the observed-space mask when given, as an .npz for
    planners (format: certsdf_ns.export.query)."""
    if not margin_voxels >= 0.0:
        raise UsageError(f"--safety-margin-voxels must be >= 0, got {margin_voxels}")
    sdf = CertifiedSDF.from_grid(geometry, safety_margin=0.0, observed=observed, transform=transform, scale=scale)
    sdf.safety_margin = margin_voxels * sdf.voxel
    return sdf.save_npz(path)


# --------------------------------------------------------------------------- frames


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


def lattice_samples(resolution: int, upsample: int, grid_resolution: int) -> int:
    """Marching-cubes samples of the lattice over a grid_resolution³ grid."""
    return math.prod(lattice_counts(resolution, upsample, (grid_resolution,) * 3))


def check_lattice_memory(resolution: int, upsample: int, grid_resolution: int, available: float) -> None:
    """Refuse a lattice whose buffers would not fit in `available` bytes, before anything is loaded."""
    need = lattice_samples(resolution, upsample, grid_resolution) * EXPORT_BYTES_PER_SAMPLE
    if need <= available:
        return
    fits = int((available / EXPORT_BYTES_PER_SAMPLE) ** (1.0 / 3.0))
    flag = f"--resolution {resolution}" if resolution else f"--resolution 0 --upsample {upsample} (grid {grid_resolution}³)"
    raise UsageError(
        f"{flag} needs about {need / 1e9:.1f} GB for its marching-cubes lattice ({EXPORT_BYTES_PER_SAMPLE} bytes per "
        f"sample) but only {available / 1e9:.1f} GB is available; use --resolution {fits} or lower."
    )


def export(cfg: MeshExportConfig) -> dict:
    """Run the export described by `cfg`; returns a summary (also printed by the CLI)."""
    import psutil

    try:
        check_lattice_args(cfg.resolution, cfg.upsample)  # before the slow load
        check_writable_dir(cfg.output_dir, "--output-dir")
    except (ValueError, OutputLocationError) as exc:
        raise UsageError(str(exc)) from exc
    config = read_run_config(cfg.load_config)
    check_lattice_memory(
        cfg.resolution, cfg.upsample, config.pipeline.model.grid_resolution, psutil.virtual_memory().available
    )
    timings = {}
    t0 = time.perf_counter()
    run = load_run(cfg.load_config)
    field = run.model.field
    timings["load"] = time.perf_counter() - t0

    real = run.model.region is not None  # a real capture: the grid covers the region the cameras look at
    t0 = time.perf_counter()
    made = export_mesh(run.pipeline, cfg.resolution, cfg.upsample, cfg.keep_unobserved, need_space=cfg.sdf_grid)
    mesh, space, removal = made.mesh, made.space, made.removal
    timings["observed space and marching cubes" if space is not None else "marching cubes"] = time.perf_counter() - t0
    if cfg.vertex_colours:
        t0 = time.perf_counter()
        rgb = vertex_colours(field, mesh, made.geometry)
        mesh.visual.vertex_colors = np.concatenate([rgb * 255.0, np.full((len(rgb), 1), 255.0)], 1).round().astype(np.uint8)
        timings["colours"] = time.perf_counter() - t0
    frame = "nerfstudio world frame"
    transform, scale = None, 1.0
    if cfg.frame == "original":
        transform, scale = run.frame()
        mesh = to_original_frame(mesh, transform, scale)
        frame = f"original scene frame (dataparser transform undone, scale {scale:.6g})"

    t0 = time.perf_counter()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    paths = [cfg.output_dir / f"{MESH_NAME}.ply"] + ([cfg.output_dir / f"{MESH_NAME}.obj"] if cfg.obj else [])
    try:
        for path in paths:
            mesh.export(path)
        if cfg.sdf_grid:
            paths.append(write_sdf_grid(field.geometry, cfg.output_dir / SDF_GRID_NAME, cfg.safety_margin_voxels, transform,
                                        scale, space))  # fmt: skip
    except OSError as exc:  # e.g. the disk filled up while meshing
        raise UsageError(f"cannot write {exc.filename or path}: {exc.strerror or exc}") from exc
    timings["write"] = time.perf_counter() - t0
    return {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "watertight": bool(mesh.is_watertight),
        "frame": frame,
        "observed": None if space is None else space.fractions(field.geometry.support),
        "observed_of": "the region's nodes" if real else "the grid's nodes",
        "mesh": "observed space" if removal is not None else ("full zero set (--keep-unobserved)" if real else "full zero set"),
        "removed": None if removal is None else asdict(removal),
        "removed_rows": [] if removal is None else removal.rows(),
        "outputs": [str(p) for p in paths],
        "timings_s": timings,
    }


def _print_summary(summary: dict) -> None:
    table = Table(title="certsdf-export", show_header=False)
    table.add_row("checkpoint", f"{summary['checkpoint']} (step {summary['step']})")
    table.add_row("vertices / faces", f"{summary['vertices']} / {summary['faces']}")
    table.add_row("watertight", str(summary["watertight"]))
    table.add_row("frame", summary["frame"])
    table.add_row("mesh", summary["mesh"])
    if summary["observed"] is not None:
        table.add_row("observed space", ", ".join(f"{k} {v:.1%}" for k, v in summary["observed"].items()) + f" of {summary['observed_of']}")
    for label, text in summary["removed_rows"]:
        table.add_row(label, text)
    table.add_row("time", ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings_s"].items()))
    for path in summary["outputs"]:
        table.add_row("wrote", path)
    CONSOLE.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `certsdf-export`."""
    silence_known_noise()  # before the run's pipeline imports nerfstudio's methods
    cfg = tyro.cli(MeshExportConfig, args=argv)
    try:
        summary = export(cfg)
    except (UsageError, CertSDFInputError) as exc:
        print(f"certsdf-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except NoSurfaceError as exc:
        print(f"certsdf-export: {exc}", file=sys.stderr)
        sys.exit(1)
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    main()
