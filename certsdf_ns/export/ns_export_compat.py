"""Make `ns-export marching-cubes` run on CPU-only machines (nerfstudio 1.1.5).

What is patched: the function object ``generate_mesh_with_multires_marching_cubes`` as seen
by ``nerfstudio.exporter.marching_cubes`` and by ``nerfstudio.scripts.exporter`` (which
imported it by name). Nothing on disk is edited.

Why: nerfstudio's version hard-codes ``.cuda()`` on its sample points, so without a GPU
the command dies with "Torch not compiled with CUDA enabled". It also builds each 512³
crop of sample points in float64 NumPy (about 8.5 GB of RAM measured at resolution 512).

The replacement, :func:`multires_marching_cubes`, is used only when CUDA is unavailable
(with CUDA, nerfstudio's own function runs unchanged). It keeps nerfstudio's algorithm and
output: the box is cut into (resolution/512)³ crops of 512³ samples; in each crop the SDF
is evaluated on a 64³ lattice, and at 128³, 256³ and 512³ only where the parent sample
had |sdf| below a threshold that halves per level (elsewhere the parent's value is
copied); skimage's marching cubes meshes each crop. Differences: points are generated from
integer indices on the CPU, only for the samples actually evaluated, in chunks of 2^20
(about 2 GB peak per crop); the threshold uses the widest crop axis; ``coarse_mask`` is
not supported (nerfstudio's exporter never passes one).

The pruning is exact for a 1-Lipschitz SDF such as certsdf's: a sample whose parent has
|sdf| ≥ threshold keeps the parent's sign (it is closer to the parent than the threshold),
and no grid edge can change sign there, so the mesh is the one a dense 512³ evaluation
would give.

Applied by :func:`patch_loaded_exporter` from :mod:`certsdf_ns.method.model`, i.e. when
ns-export loads a certsdf ``config.yml``; a no-op unless nerfstudio's exporter is already
imported, so training never pays for it. Call :func:`apply` to patch explicitly.
"""

from __future__ import annotations

import itertools
import sys
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import trimesh
from jaxtyping import Float
from torch import Tensor

CROP_N = 512  # samples per crop side, as in nerfstudio (resolution must be a multiple)
LEVELS = 4  # 64³ -> 128³ -> 256³ -> 512³ within a crop
CHUNK = 1 << 20  # points per SDF call

_ORIGINAL: Optional[Callable[..., trimesh.Trimesh]] = None


def _upsample2(x: Tensor) -> Tensor:
    """Nearest-neighbour ×2 along the three axes (what nerfstudio does with nn.Upsample)."""
    return x.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)


def _crop_sdf(
    sdf: Callable[[Tensor], Tensor], lo: np.ndarray, hi: np.ndarray, threshold: float
) -> Float[np.ndarray, "512 512 512"]:
    """Coarse-to-fine SDF samples of one crop (nerfstudio's pyramid, without its point tensors).

    At a level with block factor f, sample c stands for the block of f³ fine samples
    starting at f·c, and sits at their mean, lo + (f·c + (f − 1)/2)·h (avg-pooled points).
    """
    h = torch.as_tensor((hi - lo) / (CROP_N - 1), dtype=torch.float32)
    lo_t = torch.as_tensor(lo, dtype=torch.float32)
    values: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    for level in range(LEVELS):
        f = 2 ** (LEVELS - 1 - level)
        n = CROP_N // f
        if values is None:
            todo = torch.ones(n, n, n, dtype=torch.bool)
            values = torch.empty(n, n, n)
        else:
            assert mask is not None
            values, todo = _upsample2(values), _upsample2(mask)
        index = todo.nonzero()  # [M, 3] lattice indices to evaluate
        flat = values.view(-1)
        flat_index = (index[:, 0] * n + index[:, 1]) * n + index[:, 2]
        for start in range(0, index.shape[0], CHUNK):
            idx = index[start : start + CHUNK]
            points = lo_t + (idx.float() * f + (f - 1) / 2.0) * h
            flat[flat_index[start : start + CHUNK]] = sdf(points).reshape(-1).float().cpu()
        if level < LEVELS - 1:
            mask = values.abs() < threshold
            threshold /= 2.0
    assert values is not None
    return values.numpy()


@torch.no_grad()
def multires_marching_cubes(
    geometry_callable_field: Callable[[Float[Tensor, "N 3"]], Float[Tensor, "N"]],
    resolution: int = 512,
    bounding_box_min: Tuple[float, float, float] = (-1.0, -1.0, -1.0),
    bounding_box_max: Tuple[float, float, float] = (1.0, 1.0, 1.0),
    isosurface_threshold: float = 0.0,
    coarse_mask: Optional[Tensor] = None,
) -> trimesh.Trimesh:
    """CPU drop-in for nerfstudio's ``generate_mesh_with_multires_marching_cubes`` (same signature)."""
    from skimage import measure

    if resolution % CROP_N != 0:
        raise ValueError(f"resolution must be divisible by {CROP_N}, got {resolution}")
    if coarse_mask is not None:
        raise NotImplementedError("certsdf's CPU marching cubes does not support coarse_mask")
    box_min, box_max = np.asarray(bounding_box_min, float), np.asarray(bounding_box_max, float)
    n = resolution // CROP_N
    edges = [np.linspace(box_min[a], box_max[a], n + 1) for a in range(3)]
    meshes = []
    for i, j, k in itertools.product(range(n), repeat=3):
        lo = np.array([edges[0][i], edges[1][j], edges[2][k]])
        hi = np.array([edges[0][i + 1], edges[1][j + 1], edges[2][k + 1]])
        # nerfstudio's threshold, 16 crop voxels at the 64³ level, on the widest axis.
        threshold = float(2.0 * (hi - lo).max() / CROP_N * 8)
        z = _crop_sdf(geometry_callable_field, lo, hi, threshold)
        if z.min() > isosurface_threshold or z.max() < isosurface_threshold:
            continue
        verts, faces, normals, _ = measure.marching_cubes(
            z, level=isosurface_threshold, spacing=tuple((hi - lo) / (CROP_N - 1))
        )
        meshes.append(trimesh.Trimesh(verts + lo, faces, vertex_normals=normals))
    if not meshes:
        # nerfstudio would crash inside trimesh.util.concatenate([]); say what happened instead.
        raise ValueError(
            f"no surface: the SDF never crosses {isosurface_threshold} inside the box "
            f"{tuple(box_min)}..{tuple(box_max)} (try --bounding-box-min/--bounding-box-max)"
        )
    return trimesh.util.concatenate(meshes)


def _device_aware(*args, **kwargs) -> trimesh.Trimesh:
    """nerfstudio's function when CUDA is available, :func:`multires_marching_cubes` otherwise."""
    if torch.cuda.is_available():
        assert _ORIGINAL is not None
        return _ORIGINAL(*args, **kwargs)
    return multires_marching_cubes(*args, **kwargs)


def apply() -> None:
    """Patch nerfstudio's marching cubes (idempotent). See the module docstring."""
    global _ORIGINAL
    from nerfstudio.exporter import marching_cubes

    if _ORIGINAL is None:
        _ORIGINAL = marching_cubes.generate_mesh_with_multires_marching_cubes
    marching_cubes.generate_mesh_with_multires_marching_cubes = _device_aware
    # The exporter did `from ... import generate_mesh_with_multires_marching_cubes`, so its own
    # global must be replaced too (under "__main__" when run with `python -m`).
    for name in ("nerfstudio.scripts.exporter", "__main__"):
        module = sys.modules.get(name)
        if getattr(module, "generate_mesh_with_multires_marching_cubes", None) is _ORIGINAL:
            setattr(module, "generate_mesh_with_multires_marching_cubes", _device_aware)


def patch_loaded_exporter() -> None:
    """Apply the patch only if nerfstudio's exporter is being imported or run (cheap otherwise)."""
    main = sys.modules.get("__main__")
    if "nerfstudio.scripts.exporter" in sys.modules or hasattr(main, "generate_mesh_with_multires_marching_cubes"):
        apply()
