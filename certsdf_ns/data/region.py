"""The object's region of interest on a real capture: a ball that the certified grid covers.

A photograph's background reaches to infinity, so certsdf splits space in two: inside the
region, the certified SDF (the object, and whatever it stands on inside the region); outside,
a background model (:mod:`certsdf_ns.method.background`) that never enters the SDF, the
mesh or the SDF views. The region is a ball (centre, radius) in the dataparser's frame and the
certified grid covers its box.

Where it comes from (:func:`region_from_cameras` unless the data says or the user sets it):

- NeuS/IDR: the unit sphere, which the data's `scale_mat` defines to hold the object;
- nerfstudio (`transforms.json`), COLMAP and Blender-layout photographs: from the cameras. An
  object-centric capture points every camera at the object and keeps it in frame, so the
  centre is nerfstudio's `focus_of_attention` (the point nearest to all optical axes, from
  cameras that face it), and the radius is the largest ball around it that the median camera
  sees whole along its longer side: median distance · sin(half of the wider field of view), kept
  clear of the cameras (at most CAMERA_CLEARANCE of the nearest one's distance). The longer side,
  because a hand-held capture frames an elongated object along it (a cup photographed upright
  with the phone in portrait); the narrower side's ball cut such an object's ends off: the shared
  cup's lid reaches ~0.57 from the centre, the narrower side's ball 0.545. When the capture comes
  with sparse structure-from-motion points (COLMAP's `points3D`, or the `ply_file_path` of an
  ns-process-data `transforms.json`), that ball is tightened around them
  (:func:`tighten_to_points`): a smaller box gives the same grid finer voxels on the object;
- `--pipeline.datamanager.dataparser.region CX CY CZ R` overrides both, in the scene's own frame.

A ball derived from the cameras must be one they look at (:func:`check_cameras_see`): cameras that all
face the same way, or outwards, have no such point, and the data is refused with the way out (set the region).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio.cameras.camera_utils import focus_of_attention
from nerfstudio.cameras.cameras import Cameras, CameraType

from certsdf_ns.errors import CertSDFInputError

Region = Tuple[Float[Tensor, "3"], float]


CAMERA_CLEARANCE = 0.9
"""The camera ball's radius is at most this fraction of the nearest camera's distance to its centre:
no camera sits inside the object, and its near rays should start outside the certified grid."""


def region_from_cameras(cameras: Cameras) -> Region:
    """(centre, radius) of the ball the cameras look at (see the module docstring)."""
    c2w = cameras.camera_to_worlds.float()
    poses = torch.cat([c2w, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(c2w), 1, 4)], dim=1)
    centre = focus_of_attention(poses, c2w[:, :3, 3].mean(0))
    distance = (c2w[:, :3, 3] - centre).norm(dim=-1)
    fx, fy = cameras.fx[:, 0].float(), cameras.fy[:, 0].float()
    width, height = cameras.width[:, 0].float(), cameras.height[:, 0].float()
    half_fov = torch.atan(torch.maximum(width / (2.0 * fx), height / (2.0 * fy)))
    framed = float(torch.median(distance) * torch.sin(torch.median(half_fov)))
    return centre, min(framed, CAMERA_CLEARANCE * float(distance.min()))


LOOKED_AT_FRACTION = 0.5
"""At least this fraction of the training cameras must have the centre of the ball they look at in their image."""


def cameras_seeing(cameras: Cameras, point: Float[Tensor, "3"]) -> Tensor:
    """[N] bool: which cameras have `point` in front of them and, for pinhole cameras, inside their image
    (distortion ignored; nerfstudio's OpenGL axes, a pixel (x, y) looks along (x − cx)/fx, −(y − cy)/fy, −1).
    Fisheye and other wide-angle models count a point in front as seen."""
    c2w = cameras.camera_to_worlds.float()
    local = torch.einsum("nji,nj->ni", c2w[:, :3, :3], point.float() - c2w[:, :3, 3])
    depth = -local[:, 2]
    in_front = depth > 0
    depth = torch.where(in_front, depth, torch.ones_like(depth))
    x = cameras.cx[:, 0] + cameras.fx[:, 0] * local[:, 0] / depth
    y = cameras.cy[:, 0] - cameras.fy[:, 0] * local[:, 1] / depth
    inside = (x >= 0) & (x <= cameras.width[:, 0]) & (y >= 0) & (y <= cameras.height[:, 0])
    pinhole = cameras.camera_type[:, 0] == CameraType.PERSPECTIVE.value
    return in_front & (inside | ~pinhole)


def check_cameras_see(region: Region, cameras: Cameras, images: Sequence[Path], source: Path) -> None:
    """The ball derived from the cameras must be what they look at: its centre in at least LOOKED_AT_FRACTION
    of their images. Cameras that all face one way from a line or a plane (a slider, a forward-facing
    capture) or face outwards have no point they look at; nerfstudio's focus of attention then falls back to
    the cameras' mean position, and the ball would sit among the cameras."""
    seeing = cameras_seeing(cameras, region[0])
    if float(seeing.float().mean()) >= LOOKED_AT_FRACTION:
        return
    blind = int((~seeing).nonzero()[0, 0])
    raise CertSDFInputError(
        f"{source}: the training cameras do not look at a common point, so certsdf cannot tell where the object "
        f"is: the point nearest to their optical axes is in the images of {int(seeing.sum())} of the {len(seeing)} "
        f"training cameras (not in {Path(images[blind]).name}, for one). certsdf reconstructs an object that the cameras face from "
        "around it; cameras that all face the same way (a slider, a forward-facing capture) or face outwards have no "
        "such point. Give the object's region yourself: --pipeline.datamanager.dataparser.region CX CY CZ R (a ball "
        "in the poses' frame)."
    )


SPARSE_MIN_POINTS = 100
"""Fewer sparse points inside the camera ball than this say too little about the object's extent."""
SPARSE_QUANTILE = 0.98
"""The ball keeps this fraction of the sparse points it holds (the rest: outliers, stray matches)..."""
SPARSE_MARGIN = 1.1
"""...with this much room around them, for the parts of the object that have no points (no texture)."""


def tighten_to_points(region: Region, points: Float[Tensor, "N 3"]) -> Region:
    """The ball the cameras look at, shrunk to the sparse points it holds: radius
    min(r, SPARSE_MARGIN · the SPARSE_QUANTILE quantile of their distances to the centre).

    It only shrinks, and keeps the centre: the points inside the camera ball include what the object
    stands on, and a capture's points can be lopsided (one side textured, the other not), so they
    decide how far the structure reaches, not where the object is. Fewer than SPARSE_MIN_POINTS points
    inside leave the ball as it is."""
    centre, radius = region
    distance = (points.float() - centre).norm(dim=-1)
    inside = distance[distance < radius]
    if inside.numel() < SPARSE_MIN_POINTS:
        return region
    reach = float(torch.quantile(inside, SPARSE_QUANTILE))
    return centre, min(radius, SPARSE_MARGIN * reach)


def region_to_dataparser_frame(
    region: Tuple[float, float, float, float], transform: Float[Tensor, "3 4"], scale: float
) -> Region:
    """A ball (cx, cy, cz, r) in the scene's own frame, moved into the dataparser's frame, where
    nerfstudio put the cameras: x_ns = scale · (T · [x; 1])."""
    centre = torch.tensor(region[:3], dtype=torch.float32)
    t = transform.float()
    return scale * (t[:, :3] @ centre + t[:, 3]), float(scale) * float(region[3])


def region_box(region: Region) -> Float[Tensor, "2 3"]:
    """The axis-aligned box of a ball: the certified grid's extent."""
    centre, radius = region
    return torch.stack([centre - radius, centre + radius])
