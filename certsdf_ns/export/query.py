"""Certified distance queries for planners and other users of the geometry.

    from certsdf_ns.export.query import CertifiedSDF
    sdf = CertifiedSDF.from_checkpoint("outputs/EXP/certsdf/TS/config.yml")   # or .from_npz("certsdf_sdf.npz")
    res = sdf.query(points)            # distance [N], gradient [N, 3] (unit, outward), inside [N], observed [N]
    hit = sdf.raycast(origins, dirs)   # first hit by safe sphere tracing: t, points, normals, hit mask
    free = res.free                    # observed and outside: what a planner may treat as free

What the numbers mean. The certified SDF σ·Φ⁻¹(1 − p̂) is 1-Lipschitz and never overestimates the
distance to its *own* zero set {p̂ = ½}. The zero set is fitted to images, so it can sit off the
real object's surface (see README, "Certified distance queries"). ``safety_margin`` (world units of
the query frame) is subtracted from every distance: with margin m the returned value bounds the
distance to the zero set *inflated by m*, so it is a bound on the distance to the real object
wherever the zero set lies within m inside the real surface. :data:`DEFAULT_MARGIN_VOXELS` is the
validated default (see README for the measurement); 0 gives the raw certified values.

Frames. The grid lives in the frame the model was trained in. nerfstudio-format scenes were
re-oriented, centred and scaled (x_grid = scale·(T·[x; 1]), ``dataparser_transforms.json``); with
``frame="original"`` points and rays are given, and distances, gradients and hits returned, in the
scene's original frame (distances divided by the scale). Blender scenes have the identity.

Unobserved space. A capture photographs its object from some sides only; where no training image
constrains the grid (deeper behind every view's first surface than the occluded-space prior reaches,
outside every camera's frustum, and outside a real capture's region, whose room the background model
draws) the grid holds whatever it drifted to: its distances there say nothing about the world.
``res.observed`` is False at such points (:mod:`certsdf_ns.export.observed`). **A planner must treat
unobserved points as occupied**: a point is free only where ``res.free`` (observed and outside) holds,
and ``distance`` bounds only the distance to the fitted surface, not to unobserved space, so a path
is clear only if its points are observed too (check them along the path, e.g. at every step of a
sphere tracer, at a spacing below the voxel). Grids without that record (npz files written before
it, or :meth:`CertifiedSDF.from_grid` of a live grid) give ``observed = None``: unknown, not observed.

Sphere tracing is *safe*: each step is distance / L with L the Lipschitz constant of the trilinear
interpolant of the node SDF, computed exactly from the grid (:func:`interpolant_lipschitz`), and at
least 1, so a step never crosses the interpolated surface {distance = 0}. Interpolating samples of a
1-Lipschitz function can exceed 1 near kinks (up to √3 in the worst case): 1.07 on a binary
ball-and-box grid at σ = 2 voxels, 1.33 at σ = 1; trained grids measured 0.75–0.78 (bunny, 192³).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from certsdf_ns.certified import CertifiedSDFGrid, max_certified_distance, node_gradient, sample_grid
from certsdf_ns.console import warn
from certsdf_ns.export.observed import ObservedSpace, observed_at

DEFAULT_MARGIN_VOXELS = 1.0
"""Default safety margin in voxels of the occupancy grid (validated in the README)."""
NPZ_VERSION = 2
"""1: the SDF only. 2: also ``observed``, the observed-space node mask (absent from version 1: unknown)."""
Frame = Literal["original", "nerfstudio"]


@dataclass
class QueryResult:
    distance: Float[Tensor, "N"]
    """Certified SDF minus the safety margin (positive outside; query-frame units)."""
    gradient: Float[Tensor, "N 3"]
    """Unit outward direction ∇sdf/|∇sdf|: −gradient points towards the nearest surface from outside."""
    inside: Bool[Tensor, "N"]
    """distance < 0: inside the (margin-inflated) object."""
    observed: Optional[Bool[Tensor, "N"]] = None
    """Whether the training images constrain the grid at the point (:mod:`certsdf_ns.export.observed`); None:
    the grid carries no such record (unknown). Treat unobserved points as occupied."""

    @property
    def free(self) -> Optional[Bool[Tensor, "N"]]:
        """Observed and outside: the points a planner may treat as free (None when `observed` is unknown)."""
        return None if self.observed is None else self.observed & ~self.inside


@dataclass
class RayHits:
    t: Float[Tensor, "N"]
    """Ray parameter of the first hit (inf where there is none); in units of |direction|."""
    hit: Bool[Tensor, "N"]
    points: Float[Tensor, "N 3"]
    """origins + t·directions (NaN where there is no hit)."""
    normals: Float[Tensor, "N 3"]
    """Outward unit normals at the hits."""
    iterations: int
    lipschitz: float
    """The L used: each step was distance / L."""


@torch.no_grad()
def interpolant_lipschitz(sdf_nodes: Float[Tensor, "X Y Z"], voxel_size: Sequence[float]) -> float:
    """Exact Lipschitz constant of the trilinear interpolant of `sdf_nodes` (Euclidean norm).

    Within a cell each partial derivative is bilinear in the other two coordinates, so |∇f|² is a
    convex quadratic along each axis and its maximum over the cell is attained at a corner, where ∇f
    is the vector of the x-, y- and z-edge differences meeting there (divided by the spacing).
    """
    d = [sdf_nodes.diff(dim=a) / float(voxel_size[a]) for a in range(3)]
    nx, ny, nz = (n - 1 for n in sdf_nodes.shape)
    best = torch.zeros(nx, ny, nz)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                gx = d[0][:, b : b + ny, c : c + nz]
                gy = d[1][a : a + nx, :, c : c + nz]
                gz = d[2][a : a + nx, b : b + ny, :]
                best = torch.maximum(best, gx.square() + gy.square() + gz.square())
    return float(best.max().sqrt())


class CertifiedSDF:
    """Point and ray queries of a certified node-SDF grid (trilinear between nodes).

    Args:
        sdf_nodes: certified SDF at the grid nodes [X, Y, Z] (grid frame, margin not subtracted).
        aabb: the grid's box [[xmin, ymin, zmin], [xmax, ymax, zmax]] (grid frame).
        sigma, eps: the smoothing σ (grid-frame units) and p̂ clamp it was computed with (metadata:
            the largest certified distance is σ·Φ⁻¹(1 − ε)).
        safety_margin: subtracted from every distance, in *query-frame* units; None =
            DEFAULT_MARGIN_VOXELS voxels.
        transform, scale: x_grid = scale·(transform·[x; 1]) maps query points into the grid frame
            (identity / 1 for the grid's own frame).
        observed_nodes: the observed-space mask at the nodes [X, Y, Z] (:mod:`certsdf_ns.export.observed`),
            or None: unknown.
    """

    def __init__(
        self,
        sdf_nodes: Float[Tensor, "X Y Z"],
        aabb: Float[Tensor, "2 3"],
        sigma: float,
        eps: float,
        safety_margin: Optional[float] = None,
        transform: Optional[np.ndarray] = None,
        scale: float = 1.0,
        observed_nodes: Optional[Bool[Tensor, "X Y Z"]] = None,
    ) -> None:
        self.sdf_nodes = torch.as_tensor(sdf_nodes, dtype=torch.float32)
        if observed_nodes is not None:
            observed_nodes = torch.as_tensor(observed_nodes, dtype=torch.bool)
            if observed_nodes.shape != self.sdf_nodes.shape:
                raise ValueError(f"observed_nodes {tuple(observed_nodes.shape)} != sdf_nodes {tuple(self.sdf_nodes.shape)}")
        self.observed_nodes = observed_nodes
        self.aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(2, 3)
        self.sigma, self.eps, self.scale = float(sigma), float(eps), float(scale)
        res = torch.tensor(self.sdf_nodes.shape, dtype=torch.float32)
        self.voxel_size = (self.aabb[1] - self.aabb[0]) / (res - 1)  # grid-frame units per axis
        full = np.eye(4)
        if transform is not None:
            full[:3, :] = np.asarray(transform, dtype=np.float64).reshape(3, 4)
        rotation = full[:3, :3]
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-5):
            raise ValueError("transform must be a rigid motion (rotation + translation); put scaling in `scale`")
        self.transform = torch.from_numpy(full[:3, :]).float()
        self.safety_margin = self.voxel * DEFAULT_MARGIN_VOXELS if safety_margin is None else float(safety_margin)
        # Node gradients (central differences), for normals: computed once.
        self._grad_nodes = node_gradient(self.sdf_nodes, self.voxel_size.tolist())
        self._lipschitz: Optional[float] = None

    @property
    def lipschitz(self) -> float:
        """Exact Lipschitz constant of the interpolated SDF (the same in the query frame), computed once."""
        if self._lipschitz is None:
            self._lipschitz = interpolant_lipschitz(self.sdf_nodes, self.voxel_size.tolist())
        return self._lipschitz

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_grid(cls, grid: CertifiedSDFGrid, safety_margin: Optional[float] = None,
                  observed: Optional[ObservedSpace] = None, **frame) -> "CertifiedSDF":  # fmt: skip
        """From a live `CertifiedSDFGrid` (its current σ), with its observed space when known."""
        with torch.no_grad():
            nodes = grid.sdf_grid().detach().cpu().float()
        mask = None if observed is None else observed.observed
        return cls(nodes, grid.aabb.cpu(), grid.sigma, grid.eps, safety_margin, observed_nodes=mask, **frame)

    @classmethod
    def from_checkpoint(
        cls, config: Union[str, Path], step: Optional[int] = None, safety_margin: Optional[float] = None,
        frame: Frame = "original", observed: bool = True,
    ) -> "CertifiedSDF":  # fmt: skip
        """From an ns-train run (its `config.yml`; the newest checkpoint, or `step`): the grid exactly as the
        model had it (σ at that step, a real capture's region ball), through :func:`certsdf_ns.export.run.load_run`,
        and its observed space from the training cameras (`observed` False skips it: `observed` is then
        unknown). Needs nerfstudio and the scene's folder; `from_npz` needs neither."""
        from certsdf_ns.export.observed import pipeline_observed_space
        from certsdf_ns.export.run import load_run

        run = load_run(Path(config), step)
        transform, scale = (None, 1.0) if frame == "nerfstudio" else run.frame()
        space = pipeline_observed_space(run.pipeline) if observed else None
        return cls.from_grid(run.model.field.geometry, safety_margin, space, transform=transform, scale=scale)

    @classmethod
    def from_npz(cls, path: Union[str, Path], safety_margin: Optional[float] = None) -> "CertifiedSDF":
        """From `certsdf-export --sdf-grid`. The file holds sdf − margin; the stored margin is added back
        so `safety_margin` here replaces it (None keeps the file's)."""
        data = np.load(path)
        stored = float(data["safety_margin"])  # query-frame units
        nodes = torch.from_numpy(data["sdf"]).float() + stored * float(data["scale"])
        margin = stored if safety_margin is None else safety_margin
        observed = torch.from_numpy(data["observed"].astype(bool)) if "observed" in data.files else None
        if observed is None:
            warn(f"{path}: written before certsdf recorded observed space; query results carry observed=None (unknown).")
        return cls(nodes, torch.from_numpy(data["aabb"]), float(data["sigma"]), float(data["eps"]), margin,
                   transform=data["transform"], scale=float(data["scale"]), observed_nodes=observed)  # fmt: skip

    # -- geometry of the frame ---------------------------------------------------------
    @property
    def voxel(self) -> float:
        """Smallest voxel edge, in query-frame units."""
        return float(self.voxel_size.min()) / self.scale

    @property
    def max_distance(self) -> float:
        """The largest distance the grid can certify, σ·Φ⁻¹(1 − ε), in query-frame units."""
        return max_certified_distance(self.sigma, self.eps) / self.scale

    def to_grid(self, x: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        return self.scale * (x.float() @ self.transform[:, :3].T + self.transform[:, 3])

    def _direction_to_query(self, v: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        return v @ self.transform[:, :3]  # R^T v (row vectors): grid-frame directions back to the query frame

    # -- point queries ---------------------------------------------------------------
    def distance(self, x: Float[Tensor, "N 3"]) -> Float[Tensor, "N"]:
        """Certified SDF minus the margin (query-frame units); 1-Lipschitz up to interpolation."""
        return sample_grid(self.sdf_nodes, self.to_grid(x), self.aabb) / self.scale - self.safety_margin

    def gradient(self, x: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """Unit outward normal direction of the SDF (trilinear in the node gradients)."""
        g = sample_grid(self._grad_nodes, self.to_grid(x), self.aabb)
        return F.normalize(self._direction_to_query(g), dim=-1)

    def observed(self, x: Float[Tensor, "N 3"]) -> Optional[Bool[Tensor, "N"]]:
        """Whether the training images constrain the grid at the points: every node of the cell around the
        point is observed (False outside the box); None when the grid carries no observed-space record."""
        return None if self.observed_nodes is None else observed_at(self.observed_nodes, self.aabb, self.to_grid(x))

    def query(self, x: Float[Tensor, "N 3"]) -> QueryResult:
        d = self.distance(x)
        return QueryResult(d, self.gradient(x), d < 0, self.observed(x))

    # -- rays --------------------------------------------------------------------------
    @torch.no_grad()
    def raycast(
        self,
        origins: Float[Tensor, "N 3"],
        directions: Float[Tensor, "N 3"],
        t_max: float = math.inf,
        lipschitz: Optional[float] = None,
        iterations: int = 512,
        hit_tolerance_voxels: float = 1e-3,
        min_step_voxels: float = 1e-4,
    ) -> RayHits:
        """First zero of `distance` along each ray, by safe sphere tracing (batched, fixed iterations).

        Each active ray advances by max(distance / L, min_step), with L = `lipschitz`, by default
        max(1, the grid's exact interpolant constant :attr:`lipschitz`) — the minimum step only matters
        where distance < lipschitz·min_step, i.e. already within the hit tolerance — and stops when
        distance ≤ hit_tolerance (a hit, just *outside* the surface), when it leaves the box (or passes
        t_max: no hit), or after `iterations` steps (no hit: reported, not guessed). A ray starting inside
        (distance < 0) hits at t = 0.
        """
        if lipschitz is None:
            lipschitz = max(1.0, self.lipschitz)
        elif lipschitz < self.lipschitz:
            raise ValueError(f"lipschitz {lipschitz} is below the interpolant's constant {self.lipschitz:.4f}: unsafe")
        o, d = origins.float(), directions.float()
        norm = d.norm(dim=-1)
        t_enter, t_exit = self._box_interval(o, d)
        t_exit = torch.minimum(t_exit, torch.full_like(t_exit, t_max))
        t = t_enter.clamp_min(0.0)
        tol, min_step = hit_tolerance_voxels * self.voxel, min_step_voxels * self.voxel
        hit = torch.zeros(len(o), dtype=torch.bool)
        active = t <= t_exit
        n_iter = 0
        for n_iter in range(1, iterations + 1):
            if not active.any():
                break
            idx = active.nonzero()[:, 0]
            dist = self.distance(o[idx] + t[idx, None] * d[idx])
            done = dist <= tol
            hit[idx[done]] = True
            step = (dist / lipschitz).clamp_min(min_step) / norm[idx]
            t[idx[~done]] += step[~done]
            active[idx[done]] = False
            active &= t <= t_exit
        t = torch.where(hit, t, torch.full_like(t, math.inf))
        points = o + torch.where(hit, t, torch.full_like(t, math.nan))[:, None] * d
        normals = torch.full_like(points, math.nan)
        if hit.any():
            normals[hit] = self.gradient(points[hit])
        return RayHits(t, hit, points, normals, n_iter, float(lipschitz))

    def _box_interval(self, o: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        """[t_enter, t_exit] of each ray in the grid's box (query frame; empty interval: enter > exit)."""
        # The box is axis-aligned in the grid frame: intersect there (t is frame-independent, since
        # x_grid(o + t·d) = x_grid(o) + t·scale·R·d).
        og, dg = self.to_grid(o), self.scale * (d.float() @ self.transform[:, :3].T)
        inv = 1.0 / torch.where(dg.abs() < 1e-12, torch.full_like(dg, 1e-12), dg)
        t0, t1 = (self.aabb[0] - og) * inv, (self.aabb[1] - og) * inv
        return torch.minimum(t0, t1).max(dim=-1).values, torch.maximum(t0, t1).min(dim=-1).values

    # -- export ------------------------------------------------------------------------
    def save_npz(self, path: Union[str, Path]) -> Path:
        """Write the node grid with the margin subtracted (see README: "Certified distance queries")."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.observed_nodes is None else {"observed": self.observed_nodes.numpy().astype(np.uint8)}
        np.savez_compressed(
            path,
            version=np.int32(NPZ_VERSION),
            sdf=(self.sdf_nodes - self.safety_margin * self.scale).numpy().astype(np.float32),
            aabb=self.aabb.numpy().astype(np.float64),
            voxel_size=self.voxel_size.numpy().astype(np.float64),
            sigma=np.float64(self.sigma),
            eps=np.float64(self.eps),
            safety_margin=np.float64(self.safety_margin),
            transform=self.transform.numpy().astype(np.float64),
            scale=np.float64(self.scale),
            max_distance=np.float64(self.max_distance),
            doc=np.array(NPZ_DOC),
            **extra,
        )
        return path


NPZ_DOC = (
    "certsdf node SDF grid. sdf[i,j,k] = certified SDF − safety_margin·scale at node "
    "aabb[0] + (i,j,k)·voxel_size (grid frame; trilinear in between; positive outside). A query point x in "
    "the scene's original frame maps to x_grid = scale·(transform[:, :3]·x + transform[:, 3]); the distance "
    "in original units is trilinear(sdf, x_grid) / scale. sigma, voxel_size, aabb are in grid-frame units; "
    "safety_margin and max_distance (= sigma·Φ⁻¹(1−eps)/scale) in original units. observed[i,j,k] (when present) "
    "is 1 where the training images constrain the grid: treat a point as occupied unless every node of its cell is observed."
)
