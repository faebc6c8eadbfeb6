"""Observed space: where the training images constrain the occupancy, and where nothing does.

A capture photographs its object from some directions only. Along the ray of a training pixel the
data says: free space up to the first surface, the surface, and nothing behind it. Behind the first
surface the occluded-space prior fills `fill_depth` region radii (the model's `_fill_reach`); deeper,
no image and no loss constrains the grid, which keeps whatever it drifted to: left unlimited, the
prior filled all of that space up to the region's ball, a shell that no camera can see. An object
mask's background pixel says its whole ray is free; a sampling (validity) mask's excluded pixel
says nothing.

:func:`observed_space` classifies every grid node from the training cameras, once per load:

* **seen**: some camera has it in its frustum no further than that view's first surface (plus a
  voxel: the surface's own nodes), or on the ray of an object-mask background pixel;
* **hidden**: not seen, but at most ``depth`` behind the first surface of some view;
* **unseen**: neither; also everything outside a real capture's region, where the grid is empty by
  construction and the room is drawn by the background model, not by the grid.

*observed* = seen or hidden. The first surface of each view is the zero set of the certified SDF
(the surface the mesh shows), found from every pixel of the view at ~100 pixels across
(DEPTH_MAP_PIXELS) by the certified march of the model's sampler
(:func:`certsdf_ns.certified.band_entry`); nodes are projected into each
view with its intrinsics and lens distortion (nerfstudio's OpenCV model). With ``depth`` infinite
(synthetic scenes, whose prior fills without limit) observed is simply "inside some camera's
frustum" and no depth map is needed.

:func:`export_mesh` is the mesh `certsdf-export` writes: on a real capture the zero set of the grid
restricted to observed space (:func:`observed_geometry`), without the faces of the region's cut
(:func:`region_cut_faces`). Measurements: docs/studies/observed-space.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from jaxtyping import Bool, Float
from torch import Tensor

from certsdf_ns.certified import TRILINEAR_LIPSCHITZ, CertifiedSDFGrid, band_brick_distance, band_entry, sample_grid

DEPTH_MAP_PIXELS = 100
"""Longer side of each view's depth map, in pixels (DTU's 800×600 views: 100×75, 1/8 of the images; views
already smaller keep their size). A pixel then covers ~2 voxels of a 192³ grid at the object."""
HIT_TOLERANCE_VOXELS = 0.1
"""The march stops when its certified step falls below this (voxels): far below a depth-map pixel's footprint."""
TRACE_ITERATIONS = 64
"""March steps per ray (all rays of a view advance together)."""
REGION_CUT_VOXELS = 0.1
"""A face is the region's cut where continuing the occupancy past the sphere moves the certified SDF at the face
this many voxels inwards (:func:`region_cut_faces`). Half-trained occupancy (0.5–0.8 at the cut, the cup after
100 steps) moves it by only a few tenths of a voxel; the scene's own surfaces away from the sphere not at all."""
BRICK_VOXELS = 8
"""Brick edge of the march's empty-space map (as the model's `trace_brick_voxels`)."""


@dataclass
class ObservedSpace:
    """Seen and hidden nodes of a certified grid (see the module docstring)."""

    seen: Bool[Tensor, "X Y Z"]
    """In front of, or on, the first surface of some training view."""
    hidden: Bool[Tensor, "X Y Z"]
    """Not seen, at most `depth` behind the first surface of some training view."""
    aabb: Float[Tensor, "2 3"]
    """The grid's box (model frame)."""
    depth: float
    """How far behind a first surface still counts as hidden (model-frame units; inf: no limit)."""

    @property
    def observed(self) -> Bool[Tensor, "X Y Z"]:
        return self.seen | self.hidden

    def at(self, x: Float[Tensor, "N 3"]) -> Bool[Tensor, "N"]:
        """Observed at points (model frame): see :func:`observed_at`."""
        return observed_at(self.observed, self.aabb, x)

    def fractions(self, support: Optional[Tensor] = None) -> dict:
        """Shares of the nodes (of the support when given) that are seen, hidden and unseen."""
        weight = torch.ones_like(self.seen, dtype=torch.float32) if support is None else support.float()
        total = float(weight.sum())
        seen, hidden = float((self.seen * weight).sum()) / total, float((self.hidden * weight).sum()) / total
        return {"seen": seen, "hidden": hidden, "unseen": 1.0 - seen - hidden}


def observed_at(nodes: Bool[Tensor, "X Y Z"], aabb: Float[Tensor, "2 3"], x: Float[Tensor, "N 3"]) -> Bool[Tensor, "N"]:
    """A point is observed when every node of the grid cell around it is (trilinear weight of the unobserved
    nodes zero); points outside the box are not observed."""
    x = x.float()
    inside_box = ((x >= aabb[0]) & (x <= aabb[1])).all(dim=-1)
    return (sample_grid(nodes.float(), x, aabb) > 1.0 - 1e-4) & inside_box


# --------------------------------------------------------------------------- cameras


def distort(x: Tensor, y: Tensor, params: Tensor) -> Tuple[Tensor, Tensor]:
    """OpenCV radial-tangential distortion of normalised coordinates, params [k1, k2, k3, k4, p1, p2]:
    the forward map whose inverse nerfstudio applies when it generates rays."""
    from nerfstudio.cameras.camera_utils import _compute_residual_and_jacobian

    zero = torch.zeros_like(x)
    xd, yd, *_ = _compute_residual_and_jacobian(x, y, zero, zero, params)  # residual at xd = yd = 0
    return xd, yd


def _camera_arrays(camera) -> dict:
    """One nerfstudio camera's pose, intrinsics, size and distortion as plain tensors."""
    distortion = None
    if camera.distortion_params is not None and bool((camera.distortion_params != 0).any()):
        distortion = camera.distortion_params.reshape(6).float()
    return {
        "c2w": camera.camera_to_worlds.reshape(3, 4).float(),
        "fx": float(camera.fx), "fy": float(camera.fy), "cx": float(camera.cx), "cy": float(camera.cy),
        "width": int(camera.width), "height": int(camera.height), "distortion": distortion,
    }  # fmt: skip


def project(points: Float[Tensor, "N 3"], cam: dict, r2_max: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(pixel index [N] row-major, in-view [N], distance from the camera centre [N]) of points.

    In view: in front of the camera, inside the image, and (with distortion) no further from the axis
    than the image's corners, where the polynomial model stops being one-to-one."""
    rotation, centre = cam["c2w"][:, :3], cam["c2w"][:, 3]
    local = torch.addmm(-(centre @ rotation)[None], points, rotation)  # OpenGL camera axes: looks down −z
    distance = local.norm(dim=-1)
    z = local[:, 2].neg()
    ok = z > 1e-6
    inv = z.clamp_min(1e-6).reciprocal()
    x, y = local[:, 0] * inv, local[:, 1].neg() * inv  # OpenCV: y down
    ok &= x * x + y * y <= r2_max
    if cam["distortion"] is not None:
        x, y = distort(x, y, cam["distortion"])
    u, v = x.mul_(cam["fx"]).add_(cam["cx"]), y.mul_(cam["fy"]).add_(cam["cy"])
    ok &= (u >= 0) & (u < cam["width"]) & (v >= 0) & (v < cam["height"])
    col = u.clamp_(0, cam["width"] - 1).long()
    row = v.clamp_(0, cam["height"] - 1).long()
    return row * cam["width"] + col, ok, distance


def _corner_radius2(camera) -> float:
    """Largest squared radius of the undistorted normalised coordinates over the image (at its corners)."""
    w, h = int(camera.width), int(camera.height)
    corners = torch.tensor([[0.0, 0.0], [0.0, w], [h, 0.0], [h, w]])  # (row, col) at the pixel edges
    rays = camera.generate_rays(camera_indices=0, coords=corners)
    local = rays.directions.reshape(-1, 3) @ camera.camera_to_worlds.reshape(3, 4)[:, :3].float()
    z = (-local[:, 2]).clamp_min(1e-6)
    return float(((local[:, 0] / z) ** 2 + (local[:, 1] / z) ** 2).max()) * 1.02


# --------------------------------------------------------------------------- depth maps


@dataclass
class SurfaceTracer:
    """The certified march of the model's sampler (:func:`certsdf_ns.certified.band_entry`) towards the zero set:
    brick jumps through empty space, certified SDF steps near surfaces."""

    sdf_nodes: Tensor
    aabb: Tensor
    bricks: Tuple[Tensor, int]
    lipschitz: float
    min_step: float

    @classmethod
    def of(cls, geometry: CertifiedSDFGrid) -> "SurfaceTracer":
        nodes = geometry.sdf_grid().detach().cpu().float()
        brick = max(1, min(BRICK_VOXELS, min(nodes.shape) - 1))
        bricks = (band_brick_distance(nodes, 0.0, brick), brick)
        min_step = HIT_TOLERANCE_VOXELS * float(geometry.voxel_size.min())
        return cls(nodes, geometry.aabb.detach().cpu().float(), bricks, TRILINEAR_LIPSCHITZ, min_step)

    def first_surface(self, origins: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"]) -> Float[Tensor, "N"]:
        """Distance along unit directions to where each ray comes within `min_step`·L of the zero set (inf: it
        leaves the box first). A ray still marching after TRACE_ITERATIONS steps stops where it is: a distance
        that never exceeds its first surface's."""
        from nerfstudio.utils.math import intersect_aabb

        near, far = intersect_aabb(origins, directions, self.aabb.reshape(6), invalid_value=-1.0)
        missed = near < 0  # the ray misses the box: nothing to march (an empty interval)
        near, far = torch.where(missed, 1.0, near), torch.where(missed, 0.0, far)
        t, _, _ = band_entry(self.sdf_nodes, self.aabb, origins, directions, near, far, 0.0, self.bricks,
                             self.lipschitz, TRACE_ITERATIONS, self.min_step)  # fmt: skip
        return torch.where(t > far, torch.full_like(t, math.inf), t)


@torch.no_grad()
def depth_maps(tracer: SurfaceTracer, cameras: Sequence, pixel_states: Sequence[Optional[Tensor]]) -> list:
    """Per one-camera `Cameras`: the distance from its centre to the first surface (the certified SDF's zero
    set) through each pixel (row-major): inf where the ray meets none (or its object-mask pixel is
    background), −inf where a sampling mask excludes the pixel (nothing observed along it). All views'
    rays are marched together."""
    rays = [camera.generate_rays(camera_indices=0) for camera in cameras]
    origins = torch.cat([r.origins.reshape(-1, 3) for r in rays]).float()
    directions = torch.cat([r.directions.reshape(-1, 3) for r in rays]).float()
    depths = tracer.first_surface(origins, directions).split([r.origins[..., 0].numel() for r in rays])
    out = []
    for depth, state in zip(depths, pixel_states):
        if state is not None:
            depth = torch.where(state == 0, torch.full_like(depth, math.inf), depth)  # background: free
            depth = torch.where(state < 0, torch.full_like(depth, -math.inf), depth)  # excluded: unknown
        out.append(depth)
    return out


def _pixel_states(mask_files: Optional[Sequence], object_masks: bool, sizes: Sequence[Tuple[int, int]]) -> list:
    """Per view: None (no mask), or a row-major tensor per pixel of the (height, width) depth map: 1 object /
    valid, 0 object-mask background (a free ray), −1 excluded by a sampling mask (an unknown ray). Masks are
    read as the dataset reads them and resized with antialiasing, a pixel counting as object above ½."""
    if mask_files is None:
        return [None] * len(sizes)
    from certsdf_ns.data.datamanager import load_object_mask

    states = []
    for path, size in zip(mask_files, sizes):
        grey = load_object_mask(path)[..., 0][None, None]
        inside = F.interpolate(grey, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].reshape(-1) >= 0.5
        states.append(inside.long() if object_masks else torch.where(inside, 1, -1))
    return states


# --------------------------------------------------------------------------- the classification


@dataclass
class _View:
    """One training camera at depth-map resolution, and what its pixels say."""

    camera: dict
    r2_max: float
    surface: Optional[Tensor]
    """Distance to the first surface per pixel (row-major; see :func:`depth_maps`), None with infinite depth."""
    valid: Optional[Tensor]
    """Per pixel: False where a sampling mask excludes it (None: all valid)."""


def _classify(points: Float[Tensor, "N 3"], views: Sequence[_View], depth: float, band: float) -> Tuple[Tensor, Tensor]:
    """(seen, hidden-or-seen) of points over all views."""
    seen = torch.zeros(len(points), dtype=torch.bool)
    reach = torch.zeros(len(points), dtype=torch.bool)
    for view in views:
        pixel, ok, distance = project(points, view.camera, view.r2_max)
        if view.surface is None:  # infinite depth: in the frustum (and a valid pixel) is enough
            seen |= ok if view.valid is None else ok & view.valid[pixel]
            continue
        surface = view.surface[pixel]
        seen |= ok & (distance <= surface + band)
        reach |= ok & (distance <= surface + depth)
    return seen, reach | seen


def _coarse_to_fine(shape: Tuple[int, int, int], classify, points: Tensor, candidates: Tensor) -> Tuple[Tensor, Tensor]:
    """`classify` on every second node, then exactly only at the nodes whose coarse neighbourhood disagrees
    (the classification is a union of frusta cut at depth-map surfaces: smooth on the scale of a depth-map
    pixel, ~2 voxels). Returns full-resolution (seen, reach) over the flat node index."""
    seen = torch.zeros(shape, dtype=torch.bool)
    reach = torch.zeros(shape, dtype=torch.bool)
    known = torch.zeros(shape, dtype=torch.bool)
    known.view(-1)[candidates] = True
    coarse = known[::2, ::2, ::2]
    flat = torch.nonzero(coarse.reshape(-1))[:, 0]
    coarse_points = points.reshape(*shape, 3)[::2, ::2, ::2].reshape(-1, 3)[flat]
    c_seen, c_reach = classify(coarse_points)
    grids = []
    for values in (c_seen, c_reach):
        g = torch.zeros(coarse.shape)
        g.view(-1)[flat] = values.float()
        grids.append(g)
    # A fine node takes its nearest coarse node's value where the coarse 3×3×3 neighbourhood agrees.
    index = [torch.arange(n) // 2 for n in shape]
    agree = torch.ones(shape, dtype=torch.bool)
    for g, out in zip(grids, (seen, reach)):
        hi = F.max_pool3d(g[None, None], 3, stride=1, padding=1)[0, 0]
        lo = -F.max_pool3d(-g[None, None], 3, stride=1, padding=1)[0, 0]
        near = g[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
        out |= near > 0.5
        same = (hi == lo)[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
        agree &= same
    # With an even node count the last plane has no coarse node beyond it to agree with: always exact.
    for axis, n in enumerate(shape):
        if n % 2 == 0:
            agree.narrow(axis, n - 1, 1).fill_(False)
    redo = torch.nonzero((~agree).reshape(-1) & known.reshape(-1))[:, 0]
    if len(redo):
        f_seen, f_reach = classify(points[redo])
        seen.view(-1)[redo], reach.view(-1)[redo] = f_seen, f_reach
    seen &= known
    reach &= known
    return seen, reach


@torch.no_grad()
def observed_space(
    geometry: CertifiedSDFGrid,
    cameras,
    depth: float,
    mask_files: Optional[Sequence] = None,
    object_masks: bool = True,
    pixels: int = DEPTH_MAP_PIXELS,
) -> ObservedSpace:
    """Seen and hidden nodes of `geometry` from the training `cameras` (nerfstudio Cameras, model frame).

    Args:
        depth: how far behind a view's first surface a node still counts as hidden (model-frame units;
            inf: every node in some camera's frustum is observed, and no depth map is traced).
        mask_files: one mask image per camera, or None.
        object_masks: the masks are object masks (white = object: background pixels are free rays), not
            nerfstudio's sampling masks (white = valid: other pixels observe nothing).
        pixels: longer side of the depth maps (views already smaller keep their size).
    """
    cpu = torch.device("cpu")
    cameras = cameras.to(cpu)
    singles = []
    for i in range(len(cameras)):
        camera = cameras[i : i + 1]
        camera.rescale_output_resolution(min(1.0, pixels / max(int(camera.width), int(camera.height))))
        singles.append(camera)
    states = _pixel_states(mask_files, object_masks, [(int(c.height), int(c.width)) for c in singles])
    surfaces = [None] * len(singles) if math.isinf(depth) else depth_maps(SurfaceTracer.of(geometry), singles, states)
    views = [
        _View(_camera_arrays(camera), _corner_radius2(camera), surface, None if state is None else state >= 0)
        for camera, surface, state in zip(singles, surfaces, states)
    ]
    points = geometry.grid_points().to(cpu).reshape(-1, 3).contiguous()
    support = geometry.support
    candidates = torch.arange(len(points)) if support is None else torch.nonzero(support.to(cpu).reshape(-1) > 0)[:, 0]
    band = float(geometry.voxel_size.min())
    seen, reach = _coarse_to_fine(geometry.resolution, lambda x: _classify(x, views, depth, band), points, candidates)
    return ObservedSpace(seen, reach & ~seen, geometry.aabb.detach().cpu().float(), float(depth))


def observed_depth(model) -> float:
    """The hidden depth of a trained certsdf model, in model-frame units: on a real capture (a region) the
    occluded-space prior's reach, `fill_depth` region radii, or REAL_FILL_DEPTH_RADII where it filled without
    limit (runs with masks trained before the limit applied to them, or `--pipeline.model.fill-depth inf`);
    inf on synthetic scenes (no region: an object seen from all sides)."""
    from certsdf_ns.method.model import REAL_FILL_DEPTH_RADII

    if model.region is None:
        return math.inf
    fill = float(model.config.fill_depth)
    return (REAL_FILL_DEPTH_RADII if math.isinf(fill) else fill) * float(model.region[1])


def pipeline_observed_space(pipeline, pixels: int = DEPTH_MAP_PIXELS) -> ObservedSpace:
    """:func:`observed_space` of a loaded certsdf pipeline (:func:`certsdf_ns.export.run.load_run`'s
    `run.pipeline`): its grid, its training cameras and masks (the dataparser's train split, which nerfstudio
    builds in every mode), at the depth its prior filled."""
    from certsdf_ns.data.validation import FOREGROUND_MASKS_KEY

    outputs = pipeline.datamanager.train_dataparser_outputs
    object_masks = bool(outputs.metadata.get(FOREGROUND_MASKS_KEY))
    model = pipeline.model
    return observed_space(model.field.geometry, outputs.cameras, observed_depth(model), outputs.mask_filenames, object_masks, pixels)


# --------------------------------------------------------------------------- the mesh


def observed_geometry(geometry: CertifiedSDFGrid, space: ObservedSpace) -> CertifiedSDFGrid:
    """The grid restricted to observed space: a copy (same nodes, σ and ε) whose base classifier is
    occupancy · 1[node observed]. Like the region's ball (`support_sphere`) this is a support mask on the
    nodes: still a voxel classifier with values in [0, 1], so its smoothing is exact and its certified SDF a
    certificate; it says that nothing unobserved is the object, so its zero set closes where observed space
    ends instead of following what the grid drifted to beyond."""
    grid = CertifiedSDFGrid(geometry.resolution, geometry.aabb.detach().cpu(), sigma=geometry.sigma, eps=geometry.eps)
    grid.set_occupancy(geometry.occupancy().detach().cpu() * space.observed.float())
    return grid


@dataclass
class MeshRemoval:
    """What the export took out of the full zero set, and what it left."""

    unobserved_faces: int
    """Faces of the full zero set whose centre lies in unobserved space."""
    unobserved_area: float
    """Their share of the full zero set's area."""
    unobserved_pieces: int
    """Connected pieces of the full zero set that lay wholly in unobserved space (gone)."""
    cut_faces: int
    """Faces of the region's cut removed (:func:`region_cut_faces`)."""
    cut_area: float
    """Their share of the full zero set's area."""
    shell_before: float
    """Share of the full zero set's area within 3% of the region's boundary (beyond 0.97 radii)."""
    shell_after: float
    """The same share of the mesh's area."""
    mesh_pieces: int
    """Connected pieces of the mesh."""
    largest_piece: float
    """The largest piece's share of the mesh's area."""

    def rows(self) -> List[Tuple[str, str]]:
        """(label, text) rows for a printed summary."""
        return [
            ("removed: unobserved", f"{self.unobserved_area:.1%} of the full zero set's area ({self.unobserved_faces} "
                                    f"faces), {self.unobserved_pieces} piece(s) wholly"),
            ("removed: region's cut", f"{self.cut_area:.1%} of the full zero set's area ({self.cut_faces} faces)"),
            ("on the region's boundary", f"{self.shell_after:.1%} of the mesh's area lies beyond 0.97 region radii "
                                         f"({self.shell_before:.1%} of the full zero set's)"),
            ("pieces", f"{self.mesh_pieces}; the largest holds {self.largest_piece:.1%} of the mesh's area"),
        ]  # fmt: skip


@torch.no_grad()
def region_cut_faces(mesh: trimesh.Trimesh, geometry: CertifiedSDFGrid, region: Tuple[Tensor, float]) -> np.ndarray:
    """Faces of a zero set of `geometry` that the region's boundary made rather than the scene.

    Occupancy is zero outside the region (the grid's support), so whatever the region cuts (the table, or fill
    that reached the ball) ends in a surface hugging the sphere. Continue the occupancy beyond the sphere by
    reflection in it (a node at radius R + d takes the value of the node nearest radius R − d on the same ray
    from the centre) and smooth it again: the scene's own surfaces stay where they are, a cut's surface is
    swallowed by what now continues past it. (Reflection, not copying the value at the sphere outwards:
    copying thickens a cut table as it diverges and moves its top near the sphere.) A face is the region's cut where that continued certified SDF is below
    −REGION_CUT_VOXELS voxels (inside)."""
    centre, radius = region[0].detach().cpu().float(), float(region[1])
    occupancy = geometry.occupancy().detach().cpu().float()
    points = geometry.grid_points().cpu()
    offset = points - centre
    reach = offset.norm(dim=-1)
    outside = reach > radius
    voxel = geometry.voxel_size.cpu()
    aabb = geometry.aabb.detach().cpu().float()
    mirrored = (2.0 * radius - reach[outside]).clamp_min(0.0)
    inner = centre + offset[outside] / reach[outside, None] * mirrored[:, None]
    index = ((inner - aabb[0]) / voxel).round().long()
    index = torch.minimum(index.clamp_min(0), torch.tensor(geometry.resolution) - 1)
    continued = occupancy.clone()
    continued[outside] = occupancy[index[:, 0], index[:, 1], index[:, 2]]
    grid = CertifiedSDFGrid(geometry.resolution, aabb, sigma=geometry.sigma, eps=geometry.eps)
    grid.set_occupancy(continued)
    centres = torch.from_numpy(np.array(mesh.triangles_center, dtype=np.float32))
    swallowed = grid.sdf(centres) - geometry.sdf(centres.to(geometry.aabb.device)).cpu() < -REGION_CUT_VOXELS * float(voxel.min())
    facing_out = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - centre.numpy()) > 0
    return swallowed.numpy() & facing_out


def removal_of(full: trimesh.Trimesh, mesh: trimesh.Trimesh, cut: trimesh.Trimesh, space: ObservedSpace,
               region: Tuple[Tensor, float], support: Optional[Tensor]) -> MeshRemoval:  # fmt: skip
    """Measure what the export left out of the `full` zero set: its unobserved faces (in a cell with an
    unobserved node of the region: nodes outside it, zero anyway, count as the region's cut), the `cut` faces of
    the region; and the `mesh` it gave."""
    counted = space.observed if support is None else space.observed | (support.detach().cpu() == 0)
    centres = torch.from_numpy(np.array(full.triangles_center, dtype=np.float32))
    unobserved = ~observed_at(counted, space.aabb, centres).numpy()
    area = full.area_faces
    labels = trimesh.graph.connected_component_labels(full.face_adjacency, node_count=len(full.faces))
    pieces = len(set(labels.tolist()) - set(labels[~unobserved].tolist()))
    n_pieces, largest = piece_shares(mesh)
    return MeshRemoval(int(unobserved.sum()), float(area[unobserved].sum() / area.sum()), pieces, len(cut.faces),
                       float(cut.area / area.sum()), shell_fraction(full, region), shell_fraction(mesh, region),
                       n_pieces, largest)  # fmt: skip


@dataclass
class ExportMesh:
    """The mesh `certsdf-export` writes (model frame), and where it came from."""

    mesh: trimesh.Trimesh
    geometry: CertifiedSDFGrid
    """The grid it is (part of) the zero set of: the model's, or its restriction to observed space."""
    space: Optional[ObservedSpace]
    """The observed space (when it was computed)."""
    removal: Optional[MeshRemoval]
    """What the export removed (None: the full zero set was meshed)."""


def export_mesh(pipeline, resolution: int = 256, upsample: int = 1, keep_unobserved: bool = False,
                need_space: bool = False) -> ExportMesh:  # fmt: skip
    """The mesh of a loaded certsdf pipeline that `certsdf-export` writes, in the model's frame. On a real capture
    (a region), unless `keep_unobserved`: the zero set of :func:`observed_geometry` without the faces of the
    region's cut (:func:`region_cut_faces`); else the full zero set.
    `need_space` computes the observed space even when the mesh does not use it (for the npz). NoSurfaceError
    when nothing is left."""
    from certsdf_ns.export.mesh import NoSurfaceError, extract_mesh

    model = pipeline.model
    geometry = model.field.geometry
    restrict = model.region is not None and not keep_unobserved
    space = pipeline_observed_space(pipeline) if (restrict or need_space) else None
    if not restrict:
        return ExportMesh(extract_mesh(geometry, resolution, upsample), geometry, space, None)
    assert space is not None
    full = extract_mesh(geometry, resolution, upsample)
    restricted = observed_geometry(geometry, space)
    try:
        mesh = extract_mesh(restricted, resolution, upsample)
    except NoSurfaceError as exc:
        raise NoSurfaceError(f"{exc} (in observed space; --keep-unobserved meshes the full zero set)") from exc
    cut = region_cut_faces(mesh, restricted, model.region)
    if cut.all():
        raise NoSurfaceError("no surface: in observed space the zero set is all on the region's boundary "
                             "(--keep-unobserved meshes the full zero set)")  # fmt: skip
    removed = mesh.submesh([np.nonzero(cut)[0]], append=True) if cut.any() else trimesh.Trimesh()
    mesh.update_faces(~cut)
    mesh.remove_unreferenced_vertices()
    return ExportMesh(mesh, restricted, space, removal_of(full, mesh, removed, space, model.region, geometry.support))


def piece_shares(mesh: trimesh.Trimesh) -> Tuple[int, float]:
    """(number of connected pieces, the largest one's share of the area) of a mesh (edge-connected faces)."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    areas = np.bincount(labels, weights=mesh.area_faces)
    return len(areas), float(areas.max() / areas.sum())


def shell_fraction(mesh: trimesh.Trimesh, region: Optional[Tuple[Tensor, float]], beyond: float = 0.97) -> float:
    """Share of the mesh's area whose faces' centres lie beyond `beyond` region radii from its centre (0 without
    a region), as scripts' mesh_shell_fraction.py measures it."""
    if region is None:
        return 0.0
    centre, radius = region
    reach = np.linalg.norm(mesh.triangles_center - centre.detach().cpu().numpy(), axis=1)
    area = mesh.area_faces
    return float(area[reach > beyond * float(radius)].sum() / area.sum())
