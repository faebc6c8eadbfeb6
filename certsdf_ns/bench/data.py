"""Benchmark scenes by name: NeRF-synthetic lego, generated mesh scenes, or any Blender folder.

- `lego` -> `SceneOptions.lego` at `lego_scale` (0.25: 200x200, like certsdf's README);
- a name with an OBJ/PLY in `SceneOptions.meshes_dir` (`bunny`, `cow`) -> a scene rendered with
  `make_scene(mesh=load_and_normalise_mesh(...), image_size=mesh_image_size)` into
  `SceneOptions.scene_dir/<name>_<size>px` (rendered once, reused afterwards);
- `demo` -> the procedural demo object, rendered the same way;
- anything else is a path to an existing Blender-format folder (used at scale 1; its
  `gt_mesh.ply`, if present, is the geometry ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nerfstudio.utils.rich_utils import CONSOLE

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


@dataclass
class SceneOptions:
    """Where scenes come from."""

    lego: Path = SHARED / "nerf_synthetic" / "lego"
    """NeRF-synthetic lego folder (Blender format)."""
    lego_scale: float = 0.25
    """camera-res-scale-factor for lego (0.25: 800 -> 200 px)."""
    meshes_dir: Path = SHARED / "meshes"
    """Folder of meshes that can be named as scenes (bunny.obj, cow.obj)."""
    scene_dir: Path = Path("bench_results/scenes")
    """Where generated scenes are written (and reused)."""
    mesh_image_size: int = 200
    """Image size of generated scenes."""
    mesh_n_train: int = 100
    """Training views of generated scenes."""
    mesh_n_test: int = 10
    """Test views of generated scenes."""


@dataclass
class Scene:
    name: str
    path: Path
    scale: float
    """camera-res-scale-factor applied by every method's datamanager and by the evaluator."""
    gt_mesh: Optional[Path]


def resolve_scene(name: str, opts: SceneOptions) -> Scene:
    """Turn a scene name (see the module docstring) into a folder, rendering it if needed."""
    if name == "lego":
        return Scene("lego", Path(opts.lego), opts.lego_scale, None)
    mesh_file = next((p for ext in ("obj", "ply") if (p := Path(opts.meshes_dir) / f"{name}.{ext}").exists()), None)
    if mesh_file is not None or name == "demo":
        out = Path(opts.scene_dir) / f"{name}_{opts.mesh_image_size}px"
        if not (out / "gt_mesh.ply").exists():
            from certsdf_ns.data.scenes import load_and_normalise_mesh, make_scene

            CONSOLE.print(f"[certsdf-bench] rendering scene {name} into {out} ...")
            mesh = load_and_normalise_mesh(mesh_file) if mesh_file is not None else None
            make_scene(out, mesh=mesh, image_size=opts.mesh_image_size, n_train=opts.mesh_n_train,
                       n_val=min(4, opts.mesh_n_test), n_test=opts.mesh_n_test)  # fmt: skip
        return Scene(name, out, 1.0, out / "gt_mesh.ply")
    path = Path(name)
    if not (path / "transforms_train.json").exists():
        raise ValueError(f"scene {name!r}: not 'lego', not a mesh in {opts.meshes_dir}, not a Blender folder")
    gt = path / "gt_mesh.ply"
    return Scene(path.name, path, 1.0, gt if gt.exists() else None)
