"""A mesh seen from the front, the side, behind and below: what the held-out views never show.

    python scripts/studies/mesh_around.py DATA MESH.ply OUT.png CX CY CZ

DATA is the scene folder (any format certsdf detects); MESH is in the dataparser's frame (the bench's
meshes, `RESULTS/real/runs/*/meshes/`), and (CX, CY, CZ) is the region's centre in that frame (the
`region of interest` line of ns-train). The first training camera looks at the centre from its own
distance; it is then turned 90° and 180° about its up axis, and last looks up from below. A capture sees its object from one side, so
space filled behind the object, or the room painted on the region's far wall, shows only from behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import trimesh

from certsdf_ns.bench.meshes import cast_mesh, save_picture
from certsdf_ns.data.dataparser import CertSDFDataParserConfig


def look_at(position: np.ndarray, centre: np.ndarray, up: np.ndarray) -> torch.Tensor:
    """A nerfstudio (OpenGL) camera-to-world [3, 4] at `position` looking at `centre`."""
    forward = (centre - position) / np.linalg.norm(centre - position)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    return torch.tensor(np.stack([right, np.cross(right, forward), -forward, position], axis=1), dtype=torch.float32)


def mesh_around(data: Path, mesh_path: Path, out: Path, centre: np.ndarray) -> None:
    """Write the front, side and behind pictures of `mesh_path` around `centre`, side by side, to `out`."""
    camera = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train").cameras[0:1]
    camera.rescale_output_resolution(0.5)
    pose = camera.camera_to_worlds[0].numpy()
    offset, up = pose[:, 3] - centre, pose[:, 1]
    mesh = trimesh.load(mesh_path, force="mesh")
    panels = []
    poses = []
    for angle in (0.0, 90.0, 180.0):
        turn = trimesh.transformations.rotation_matrix(np.radians(angle), up)[:3, :3]
        poses.append(look_at(centre + turn @ offset, centre, up))
    poses.append(look_at(centre - up * np.linalg.norm(offset), centre, offset))  # below, the front at the top
    for pose in poses:
        camera.camera_to_worlds[0] = pose
        panels.append(cast_mesh(mesh, camera).grey())
        panels.append(np.ones((panels[-1].shape[0], 4)))
    save_picture(out, np.concatenate(panels[:-1], axis=1))
    print(f"front, side, behind, below -> {out}")


def main() -> None:
    mesh_around(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), np.array([float(v) for v in sys.argv[4:7]]))


if __name__ == "__main__":
    main()
