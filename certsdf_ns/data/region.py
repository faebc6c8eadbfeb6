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
  sees whole: median distance · sin(half of the narrower field of view);
- `--pipeline.datamanager.dataparser.region CX CY CZ R` overrides both, in the scene's own frame.
"""

from __future__ import annotations

from typing import Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio.cameras.camera_utils import focus_of_attention
from nerfstudio.cameras.cameras import Cameras

Region = Tuple[Float[Tensor, "3"], float]


def region_from_cameras(cameras: Cameras) -> Region:
    """(centre, radius) of the ball the cameras look at (see the module docstring)."""
    c2w = cameras.camera_to_worlds.float()
    poses = torch.cat([c2w, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(c2w), 1, 4)], dim=1)
    centre = focus_of_attention(poses, c2w[:, :3, 3].mean(0))
    distance = (c2w[:, :3, 3] - centre).norm(dim=-1)
    fx, fy = cameras.fx[:, 0].float(), cameras.fy[:, 0].float()
    width, height = cameras.width[:, 0].float(), cameras.height[:, 0].float()
    half_fov = torch.atan(torch.minimum(width / (2.0 * fx), height / (2.0 * fy)))
    radius = float(torch.median(distance) * torch.sin(torch.median(half_fov)))
    return centre, radius


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
