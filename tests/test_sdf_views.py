"""The viewer's pictures of the certified SDF, checked against a grid with a known surface.

A ball of radius R is voxelised into a CertifiedSDFGrid with ``set_occupancy``; its smoothed
zero level lies within a voxel of the sphere |x − c| = R (smoothing moves the level of a
convex body slightly inwards, by O(σ²/R)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.bench.certify import smoothed_surface
from certsdf_ns.export.mesh import NoSurfaceError, extract_mesh
from certsdf_ns.method.sdf_outputs import diverging_colours, ray_sdf_outputs
from certsdf_ns.viewer.sdf_views import (
    sdf_slice,
    sdf_slice_image,
    slice_plane,
    slice_points,
    zero_crossings,
)

RES = 48
CENTRE = torch.tensor([0.2, -0.1, 0.05])
RADIUS = 0.5


@pytest.fixture(scope="module")
def ball() -> CertifiedSDFGrid:
    grid = CertifiedSDFGrid(RES, sigma=0.05)
    grid.sigma = 1.5 * float(grid.voxel_size[0])
    grid.set_occupancy(((grid.grid_points() - CENTRE).norm(dim=-1) <= RADIUS).float())
    return grid


def voxel(grid: CertifiedSDFGrid) -> float:
    return float(grid.voxel_size[0])


def test_diverging_colours_are_rdbu_clipped_at_scale():
    rgb = diverging_colours(torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0]), scale=1.0)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[3], rgb[4])  # clipped beyond ±scale
    assert rgb[1, 0] > 0.35 and rgb[1, 2] < 0.2  # inside: dark red
    assert rgb[3, 2] > 0.35 and rgb[3, 0] < 0.05  # outside: dark blue
    assert (rgb[2] > 0.94).all()  # zero: white
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_plane_is_a_proper_rotation_through_the_offset(axis):
    aabb = torch.tensor([[-1.0, -2.0, -3.0], [1.0, 2.0, 3.0]])
    plane = slice_plane(aabb, axis, 0.5)
    assert np.isclose(np.linalg.det(plane.rotation), 1.0)
    assert np.allclose(plane.rotation[:, 2], np.eye(3)[axis])  # normal
    assert np.isclose(plane.centre[axis], 0.5 * float(aabb[1, axis]))
    u, v = (axis + 1) % 3, (axis + 2) % 3
    assert (plane.width, plane.height) == (float(aabb[1, u] - aabb[0, u]), float(aabb[1, v] - aabb[0, v]))
    pts = slice_points(plane, max_pixels=64)
    # columns run along +u, rows along +v, every pixel on the plane and inside the box
    assert (pts[:, 1:, u] > pts[:, :-1, u]).all() and (pts[1:, :, v] > pts[:-1, :, v]).all()
    assert torch.allclose(pts[..., axis], torch.tensor(plane.centre[axis], dtype=torch.float32))
    assert (pts >= aabb[0]).all() and (pts <= aabb[1]).all()
    assert max(pts.shape[:2]) == 64


def test_slice_zero_crossing_lies_on_the_analytic_sphere(ball):
    offset = float(CENTRE[2])  # box is [-1, 1]: offset in box half-widths = world z
    values, plane = sdf_slice(ball, axis=2, offset=offset, max_pixels=200)
    points = slice_points(plane, max_pixels=200)
    contour = zero_crossings(values)
    dist = (points[contour] - CENTRE).norm(dim=-1)
    pixel = plane.width / 200
    assert contour.sum() > 0.8 * (2 * np.pi * RADIUS / pixel)  # a closed ring, not a few dots
    assert (dist - RADIUS).abs().max() < voxel(ball), (dist.min(), dist.max())
    # the certified SDF is a lower bound on the distance to the smoothed surface: away from
    # the surface it never exceeds the true distance to the sphere by more than a voxel
    true = (points - CENTRE).norm(dim=-1) - RADIUS
    assert (values.abs() <= true.abs() + voxel(ball)).all()
    # and it saturates at ±σ·Φ⁻¹(1−ε)
    assert values.max() <= ball.max_distance + 1e-5 and values.min() >= -ball.max_distance - 1e-5


def test_slice_image_colours(ball):
    values, plane = sdf_slice(ball, axis=2, offset=float(CENTRE[2]), max_pixels=128)
    image = sdf_slice_image(values, ball.max_distance, iso_step=ball.sigma)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    far_out = tuple(image[0, 0])  # box corner: SDF saturated at +max_distance
    deep_in = tuple(image[values.argmin() // 128, values.argmin() % 128])
    lut_out = tuple((diverging_colours(torch.tensor([1.0]), 1.0)[0] * 255).round().to(torch.uint8).tolist())
    lut_in = tuple((diverging_colours(torch.tensor([-1.0]), 1.0)[0] * 255).round().to(torch.uint8).tolist())
    assert far_out == lut_out and deep_in == lut_in
    contour = zero_crossings(values).numpy()
    assert (image[contour] == 0).all()  # the zero level is drawn black
    assert (image[~contour].sum(-1) > 0).all()  # ...and nothing else is
    # iso-lines every σ: darker pixels between the contour and the saturated region
    plain = sdf_slice_image(values, ball.max_distance, iso_step=None)
    darker = (image.astype(int).sum(-1) < plain.astype(int).sum(-1)) & ~contour
    assert darker.sum() > 0
    assert (values.numpy()[darker] < ball.max_distance).all()


def test_mesh_is_close_to_the_analytic_sphere(ball):
    """The viewer's Extract-mesh (the one extractor, on the node SDF itself)."""
    mesh = extract_mesh(ball, resolution=0)
    vertices, faces = mesh.vertices, mesh.faces
    assert len(vertices) > 500 and len(faces) > 1000
    assert np.isfinite(vertices).all() and faces.min() >= 0 and faces.max() < len(vertices)
    radii = np.linalg.norm(vertices - CENTRE.numpy(), axis=1)
    assert np.abs(radii - RADIUS).max() < voxel(ball)
    assert abs(radii.mean() - RADIUS) < 0.5 * voxel(ball)
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    assert mesh.is_watertight
    assert mesh.volume > 0  # faces oriented outwards
    assert abs(mesh.volume / (4 / 3 * np.pi * RADIUS**3) - 1) < 0.1


def test_smoothed_occupancy_level_set_faces_outward_too(ball):
    """The same extractor on p̂ = ½ (which grows inwards, unlike the SDF): still outward faces,
    on the same surface as the SDF's zero set."""
    mesh = smoothed_surface(ball)
    assert mesh.is_watertight and mesh.volume > 0
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - CENTRE.numpy())
    assert (outward > 0).all()
    radii = np.linalg.norm(mesh.vertices - CENTRE.numpy(), axis=1)
    assert np.abs(radii - RADIUS).max() < voxel(ball)


def test_mesh_vertices_are_in_world_coordinates_for_a_non_cubic_box():
    grid = CertifiedSDFGrid((40, 30, 20), aabb=((-2.0, -1.0, 0.0), (2.0, 2.0, 1.0)), sigma=0.1)
    centre = torch.tensor([0.5, 0.5, 0.5])
    grid.set_occupancy(((grid.grid_points() - centre).norm(dim=-1) <= 0.3).float())
    vertices = extract_mesh(grid, resolution=0).vertices
    assert np.allclose(vertices.mean(axis=0), centre.numpy(), atol=0.05)


def test_mesh_of_an_empty_grid_is_refused():
    grid = CertifiedSDFGrid(16, sigma=0.1, init_logit=-10.0)
    with pytest.raises(NoSurfaceError, match="no surface"):
        extract_mesh(grid, resolution=0)


def test_ray_outputs_min_and_outline():
    sdf = torch.tensor([[0.5, 0.2, 0.3], [0.1, -0.4, 0.2], [0.004, 0.2, 0.6]])[..., None]
    out = ray_sdf_outputs(sdf, max_distance=0.5, band=0.01)
    assert torch.allclose(out["ray_min_sdf"][:, 0], torch.tensor([0.2, -0.4, 0.004]))
    rgb = out["ray_min_sdf_rgb"]
    assert rgb.shape == (3, 3)
    assert rgb[0, 2] > rgb[0, 0]  # clears the surface: blue
    assert rgb[1, 0] > rgb[1, 2]  # goes inside: red
    assert (rgb[2] == 0).all()  # grazes the zero level: outline
