"""How much of a mesh lies on the region's ball: the room painted on the region's wall, rather than the object.

    python scripts/studies/mesh_shell_fraction.py MESH.ply CX CY CZ R

MESH in the frame of the ball (the bench's meshes, `bench_results/real/runs/*/meshes/`, are in the
dataparser's frame, as is the `region of interest` line that ns-train prints). Prints the fraction of
the mesh's area whose faces lie beyond 0.97 and 0.9 of the radius. A table cut by the ball adds a thin
rim there (a plane through the centre: 6% of its disc lies beyond 0.97); more is surface on the wall.
"""

import sys

import numpy as np
import trimesh


def shell_fractions(mesh: trimesh.Trimesh, centre: np.ndarray, radius: float) -> dict:
    """Fractions of the mesh's area whose faces' centres lie beyond 0.97 and 0.9 radii of the centre."""
    reach = np.linalg.norm(mesh.triangles_center - centre, axis=1) / radius
    area = mesh.area_faces
    return {f"beyond {t}": float(area[reach > t].sum() / area.sum()) for t in (0.97, 0.9)}


def main() -> None:
    mesh = trimesh.load(sys.argv[1], force="mesh")
    centre, radius = np.array([float(v) for v in sys.argv[2:5]]), float(sys.argv[5])
    print(f"area {mesh.area:.3f}; " + ", ".join(f"{k} radii: {v:.3f}" for k, v in shell_fractions(mesh, centre, radius).items()))


if __name__ == "__main__":
    main()
