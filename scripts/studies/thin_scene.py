"""Write a mesh with thin parts (a critter: a body, four legs, a tail and two antennae) for the thin-part study.

The thin parts are 0.9–2 voxels of the default 192³ grid thick once the scene is normalised to the generated
scenes' extent (1.8 in a box of side 3): the case the σ study found hardest. Kept out of the tests.

    python scripts/studies/thin_scene.py bench_results/thin_meshes/critter.obj
    certsdf-bench quality --scene-names critter --scenes.meshes-dir bench_results/thin_meshes ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import trimesh


def segment(start, end, radius: float) -> trimesh.Trimesh:
    """A closed cylinder of ``radius`` from ``start`` to ``end``."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    return trimesh.creation.cylinder(radius=radius, segment=np.stack([start, end]), sections=24)


def critter() -> trimesh.Trimesh:
    body = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    body.apply_scale([0.55, 0.3, 0.25])
    head = trimesh.creation.icosphere(subdivisions=3, radius=0.16)
    head.apply_translation([0.62, 0.0, 0.12])
    parts = [body, head]
    for x in (-0.3, 0.3):  # legs: 0.036 thick, splayed a little
        for y in (-0.15, 0.15):
            parts.append(segment([x, y, -0.15], [x * 1.2, y * 1.6, -0.75], 0.018))
    parts.append(segment([-0.5, 0.0, 0.05], [-1.15, 0.0, 0.45], 0.012))  # tail: 0.024 thick
    for y in (-0.06, 0.06):  # antennae: 0.016 thick
        parts.append(segment([0.7, y, 0.25], [0.95, y * 3.0, 0.6], 0.008))
    return trimesh.util.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the OBJ file to write (its stem names the bench scene)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    critter().export(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
