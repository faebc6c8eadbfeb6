"""Real captures: the object's region, the grid's support, and the background model's separation.

The end-to-end case renders the tiny generated object inside a textured room (RGB photographs,
no alpha: certsdf treats it as a real capture), trains through the real `ns-train`, and checks
the certified SDF and the exported mesh against the object's own ground-truth mesh: nothing of
the room may end up inside the certified grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from conftest import TINY_TRAIN_ARGS, free_port, ns, run_cli

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.data.region import region_from_cameras, region_to_dataparser_frame
from certsdf_ns.data.scenes import look_at_origin
from certsdf_ns.data.validation import FOREGROUND_MASKS_KEY, REAL_CAPTURE_KEY, REGION_KEY

# The fixture run's usual Chamfer-L1 range (tests/test_mesh_export.py: measured 0.063 on the tiny
# RGBA scene after 300 steps on a 64³ grid, bound 0.10).
CHAMFER_BOUND = 0.10
# A third of the fixture run's steps already separate the object from the room: measured sign agreement
# 0.982 (bound 0.95) and Chamfer-L1 0.059 (bound CHAMFER_BOUND) after 100 steps (0.981 and 0.043 after 150).
ROOM_STEPS = 100


# --------------------------------------------------------------------------- the region
def _cameras_looking_at(target: np.ndarray, distance: float, n: int, width: int, fx: float) -> Cameras:
    rng = np.random.default_rng(3)
    poses = []
    for _ in range(n):
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2]) + 0.2  # the upper hemisphere, as a capture around an object
        direction /= np.linalg.norm(direction)
        pose = look_at_origin(direction * distance)
        pose[:3, 3] += target
        poses.append(pose[:3, :4])
    return Cameras(
        camera_to_worlds=torch.tensor(np.stack(poses), dtype=torch.float32),
        fx=fx, fy=fx, cx=width / 2.0, cy=width * 0.375,
        width=width, height=int(width * 0.75),
    )  # fmt: skip


def test_region_from_cameras_is_the_ball_they_look_at() -> None:
    target = np.array([0.3, -0.2, 0.1])
    cameras = _cameras_looking_at(target, distance=3.0, n=30, width=400, fx=300.0)
    centre, radius = region_from_cameras(cameras)
    np.testing.assert_allclose(centre.numpy(), target, atol=1e-4)
    # The wider (horizontal) half field of view, atan(200 / 300): an object framed along the image's
    # longer side is inside, and its ends are not cut (the narrower side's ball would be 3·sin(atan(0.5))).
    assert radius == pytest.approx(3.0 * math.sin(math.atan(200.0 / 300.0)), rel=1e-5)


def test_region_from_cameras_stays_clear_of_the_nearest_camera() -> None:
    from certsdf_ns.data.region import CAMERA_CLEARANCE

    target = np.array([0.3, -0.2, 0.1])
    # A fisheye-wide field of view would give a ball past the cameras themselves (3·sin(atan(4)) ≈ 2.91).
    wide = _cameras_looking_at(target, distance=3.0, n=30, width=400, fx=50.0)
    assert region_from_cameras(wide)[1] == pytest.approx(CAMERA_CLEARANCE * 3.0, rel=1e-5)
    # One camera close up bounds the ball, whatever the median camera frames.
    poses = wide.camera_to_worlds.clone()
    poses[0, :3, 3] = torch.tensor(target, dtype=torch.float32) + 0.5 * (poses[0, :3, 3] - torch.tensor(target, dtype=torch.float32))
    close = _cameras_looking_at(target, distance=3.0, n=30, width=400, fx=300.0)
    close.camera_to_worlds = poses
    assert region_from_cameras(close)[1] == pytest.approx(CAMERA_CLEARANCE * 1.5, rel=1e-4)


def test_sparse_points_tighten_the_camera_ball_but_never_widen_or_move_it() -> None:
    from certsdf_ns.data.region import SPARSE_MARGIN, tighten_to_points

    g = torch.Generator().manual_seed(3)
    centre, radius = torch.tensor([0.1, -0.2, 0.3]), 1.0
    on_object = centre + 0.3 * torch.nn.functional.normalize(torch.randn(2000, 3, generator=g), dim=-1)
    far_away = centre + 5.0 * torch.nn.functional.normalize(torch.randn(500, 3, generator=g), dim=-1)  # the room
    strays = centre + 0.9 * torch.rand(10, 1, generator=g) * torch.nn.functional.normalize(torch.randn(10, 3, generator=g), dim=-1)
    c, r = tighten_to_points((centre, radius), torch.cat([on_object, far_away, strays]))
    torch.testing.assert_close(c, centre)
    assert r == pytest.approx(0.3 * SPARSE_MARGIN, rel=1e-3)  # the 2% quantile drops the strays
    filling = centre + torch.rand(3000, 1, generator=g) ** (1 / 3) * torch.nn.functional.normalize(torch.randn(3000, 3, generator=g), dim=-1)
    assert tighten_to_points((centre, radius), filling)[1] == radius  # structure everywhere: not widened either
    assert tighten_to_points((centre, radius), on_object[:50])[1] == radius  # too few points to say


def test_region_option_is_given_in_the_scenes_own_frame() -> None:
    """x_ns = scale·(T·[x; 1]): a ball set in the data's frame lands where nerfstudio put the cameras."""
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1.0]])
    transform = torch.cat([rotation, torch.tensor([[1.0], [2.0], [3.0]])], dim=1)
    centre, radius = region_to_dataparser_frame((10.0, 0.0, -5.0, 4.0), transform, scale=0.25)
    expected = 0.25 * (rotation @ torch.tensor([10.0, 0.0, -5.0]) + torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(centre, expected)
    assert radius == pytest.approx(1.0)


def test_support_sphere_keeps_the_zero_set_inside_the_region_and_the_smoothing_exact() -> None:
    """A full grid with a support ball of radius 0.6: the certified zero set is (up to the voxel
    rounding of the support and the smoothing's shrink) that ball, the node p̂ still equals the exact
    smoothing of the (supported) voxel classifier, and points beyond the ball are certified outside."""
    grid = CertifiedSDFGrid(33, sigma=0.08, init_logit=-3.0, support_sphere=((0.0, 0.0, 0.0), 0.6))
    grid.set_occupancy(torch.ones(33, 33, 33))
    assert float(grid.occupancy().detach().sum()) == pytest.approx(float(grid.support.sum()))
    nodes = grid.grid_points().reshape(-1, 3)
    pick = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(0))[:400]
    exact = grid.exact_smoothed_occupancy(nodes[pick])
    torch.testing.assert_close(grid.smoothed_occupancy_grid().reshape(-1)[pick], exact, atol=2e-6, rtol=0)
    directions = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    voxel = float(grid.voxel_size[0])
    outside = grid.sdf(directions * (0.6 + 1.5 * voxel))
    inside = grid.sdf(directions * (0.6 - 3.0 * voxel))
    assert bool((outside > 0).all()) and bool((inside < 0).all())
    # Far outside the ball the certified distance is (up to its clamp) at least the distance to the ball.
    far = grid.sdf(directions * 0.9)
    assert bool((far >= min(0.9 - 0.6 - voxel, grid.max_distance) - 1e-4).all())


# --------------------------------------------------------------------------- the model
def _region_model(background: str = "auto", object_masks: bool = False):
    from certsdf_ns.method.model import CertSDFModelConfig

    config = CertSDFModelConfig(
        grid_resolution=24, hash_levels=4, hash_log2_size=12, hash_max_res=64, background_model=background,
        num_coarse_samples=16, num_fine_samples=8,
    )  # fmt: skip
    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    metadata = {REGION_KEY: torch.tensor([0.0, 0.0, 0.0, 1.0]), REAL_CAPTURE_KEY: True}
    if object_masks:
        metadata[FOREGROUND_MASKS_KEY] = True
    return config.setup(scene_box=box, num_train_data=4, metadata=metadata)


def _rays(origins, directions) -> RayBundle:
    n = len(origins)
    return RayBundle(
        origins=torch.tensor(origins, dtype=torch.float32), directions=torch.nn.functional.normalize(torch.tensor(directions, dtype=torch.float32), dim=-1),
        pixel_area=torch.ones(n, 1), camera_indices=torch.zeros(n, 1, dtype=torch.long),
    )  # fmt: skip


def test_background_is_composited_behind_the_region_and_never_reaches_the_grid() -> None:
    model = _region_model()
    assert model.config.background_model == "grid"  # auto, real capture, no tinycudann
    with torch.no_grad():
        model.field.geometry.set_occupancy((model.field.geometry.grid_points().norm(dim=-1) < 0.4).float())
    model.train()
    model.set_schedule_step(100)  # past the paper-map warm-up
    # Ray 0 crosses the object; ray 1 passes beside the unit ball (region) and sees only background.
    bundle = _rays([[0.0, 0.0, -3.0], [0.0, 1.3, -3.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    outputs = model(bundle)
    assert float(outputs["accumulation"][0]) > 0.99 and float(outputs["accumulation"][1]) == 0.0
    torch.testing.assert_close(outputs["rgb"][1], outputs["rgb_background"][1])
    torch.testing.assert_close(outputs["rgb"][0], outputs["rgb_foreground"][0], atol=1e-2, rtol=0)
    # The loss of the background-only ray moves the background field, never the certified grid.
    model.zero_grad()
    outputs["rgb"][1].sum().backward()
    assert model.field.geometry.logits.grad is None or float(model.field.geometry.logits.grad.abs().max()) == 0.0
    assert float(model.background_field.volume.grad.abs().max()) > 0.0
    groups = model.get_param_groups()
    assert any(p is model.background_field.volume for p in groups["fields"])


def _fill_loss_gradient(model, step: int, spread: float = 0.5) -> torch.Tensor:
    """d(fill loss)/d(occupancy logits) after one training forward at `step` of rays (along +z, x and y in
    ±spread) through a fog of occupancy 0.3 with a small dense core: in front of the core T ≈ 1 (free by the
    foreground's account), behind it T ≈ 0. The prior sees the first `fill_ray_fraction` of the rays."""
    with torch.no_grad():
        core = (model.field.geometry.grid_points().norm(dim=-1) < 0.3).float()
        model.field.geometry.set_occupancy(0.3 + 0.69 * core)
    model.train()
    model.set_schedule_step(step)
    x = torch.linspace(-spread, spread, 8)
    origins = [[float(a), float(b), -3.0] for a in x for b in x]
    outputs = model(_rays(origins, [[0.0, 0.0, 1.0]] * len(origins)))
    model.zero_grad()
    outputs["fill_loss"].backward()
    return model.field.geometry.logits.grad


def test_occluded_space_prior_only_fills_at_first_on_a_real_capture_without_object_masks() -> None:
    """Without masks the background model may be rendering part of the object, so the foreground's own
    transmittance is no evidence of free space: for the first REAL_FILL_ONLY_STEPS the prior pulls
    occupancy up behind surfaces, never down; then it carves too. With object masks (or alpha) it carves
    from the start."""
    from certsdf_ns.method.model import REAL_FILL_ONLY_STEPS

    torch.manual_seed(0)
    real = _region_model()
    assert real.config.fill_carve_start_step == REAL_FILL_ONLY_STEPS
    grad = _fill_loss_gradient(real, 100)  # still the paper map: the core is opaque, T ≈ 0 behind it
    assert float(grad.max()) <= 0.0 and float(grad.min()) < 0.0  # descent only raises occupancy
    grad = _fill_loss_gradient(real, REAL_FILL_ONLY_STEPS)
    assert float(grad.max()) > 0.0  # the fog in front is pulled down too
    torch.manual_seed(0)
    masked = _region_model(object_masks=True)
    assert masked.config.fill_carve_start_step == 0
    assert float(_fill_loss_gradient(masked, 100).max()) > 0.0


def test_occluded_space_prior_reaches_only_fill_depth_behind_the_surface_without_object_masks() -> None:
    """A real capture never sees the space under the table or far behind the object; filling all of it to the
    region's ball made the DTU skull's mesh a ball. With or without masks the prior fills only `fill_depth`
    region radii behind the first surface and leaves deeper space alone."""
    from certsdf_ns.method.model import REAL_FILL_DEPTH_RADII

    def behind_core(grad: torch.Tensor, model, z_lo: float, z_hi: float) -> torch.Tensor:
        points = model.field.geometry.grid_points()
        on_rays = (points[..., 0].abs() < 0.2) & (points[..., 1].abs() < 0.2) & (points.norm(dim=-1) < 0.97)
        return grad.reshape(points.shape[:-1])[on_rays & (points[..., 2] > z_lo) & (points[..., 2] < z_hi)]

    torch.manual_seed(0)
    real = _region_model()
    assert real.config.fill_depth == REAL_FILL_DEPTH_RADII
    real.config.fill_depth = 0.25  # the 24³ test grid's region is 1 wide; the core (radius 0.3) ends at z = 0.3
    real.config.fill_ray_fraction = 1.0
    grad = _fill_loss_gradient(real, 100, spread=0.15)  # every ray through the core
    assert float(behind_core(grad, real, 0.35, 0.5).max()) < 0.0  # just behind the surface: filled
    deep = behind_core(grad, real, 0.74, 0.97)
    torch.manual_seed(0)
    masked = _region_model(object_masks=True)
    assert masked.config.fill_depth == REAL_FILL_DEPTH_RADII  # masks do not see behind the object either
    masked.config.fill_depth = math.inf  # what it was: no limit
    masked.config.fill_ray_fraction = 1.0
    unlimited = behind_core(_fill_loss_gradient(masked, 100, spread=0.15), masked, 0.74, 0.97)
    assert float(unlimited.max()) < 0.0  # without a limit the prior fills all the way to the ball
    assert float(deep.abs().max()) < 0.01 * float(unlimited.abs().min())  # with it: deep space left alone


def test_no_background_model_on_synthetic_scenes() -> None:
    from certsdf_ns.method.model import CertSDFModelConfig

    config = CertSDFModelConfig(grid_resolution=16, hash_levels=2, hash_log2_size=10, hash_max_res=32)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.5] * 3, [1.5] * 3])), num_train_data=2, metadata={})
    assert model.background_field is None and model.region is None and model.field.geometry.support is None
    assert model.config.fill_carve_start_step == 0  # alpha says where space is free
    assert math.isinf(model.config.fill_depth)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def room_scene(tmp_path_factory) -> Path:
    from certsdf_ns.data.scenes import make_scene

    # The RGBA fixture scene of tests/conftest.py (48 px, 40 views), photographed inside a room.
    return make_scene(tmp_path_factory.mktemp("room") / "room", image_size=48, n_train=40, n_val=4, n_test=4, background="room")


def _train(scene: Path, out: Path, extra=()) -> Path:
    proc = run_cli(
        [
            ns("ns-train"), "certsdf", "--data", scene, "--output-dir", out, "--experiment-name", "room",
            "--timestamp", "run", "--vis", "tensorboard", "--max-num-iterations", ROOM_STEPS,
            "--viewer.quit-on-train-completion", "True", *TINY_TRAIN_ARGS, *extra,
        ],
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "real capture" in proc.stdout and "region of interest" in proc.stdout, proc.stdout[-3000:]
    return out / "room" / "certsdf" / "run" / "config.yml"


def _separation(config: Path, scene: Path, out: Path):
    from nerfstudio.utils.eval_utils import eval_setup

    from certsdf_ns.export.diagnostics import surface_report
    from certsdf_ns.export.geometry_eval import evaluate_mesh

    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    report = surface_report(pipeline.model.field, scene / "gt_mesh.ply")
    proc = run_cli([ns("certsdf-export"), "--load-config", config, "--output-dir", out, "--resolution", 128], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mesh = trimesh.load(out / "certsdf_mesh.ply", force="mesh")
    gt = trimesh.load(scene / "gt_mesh.ply", force="mesh")
    metrics = evaluate_mesh(mesh, gt, n_points=30_000)
    return report, metrics, pipeline


def test_object_in_a_room_trains_to_the_object_not_the_room(room_scene: Path, tmp_path: Path) -> None:
    config = _train(room_scene, tmp_path / "out")
    report, metrics, pipeline = _separation(config, room_scene, tmp_path / "mesh")
    print(f"room scene: sign agreement {report.sign_agreement:.3f}, Chamfer-L1 {metrics.chamfer_l1:.4f}")
    assert pipeline.model.background_field is not None
    assert report.sign_agreement >= 0.95, report
    assert metrics.chamfer_l1 <= CHAMFER_BOUND, metrics


def test_rendered_views_show_the_background_in_rgb_and_the_region_alone_in_the_sdf_views() -> None:
    """What the viewer and ns-eval render (eval mode, a whole camera): rgb holds the background where
    rays miss the object, while accumulation, depth and the certified-SDF views are the region's."""
    model = _region_model()
    with torch.no_grad():
        model.field.geometry.set_occupancy((model.field.geometry.grid_points().norm(dim=-1) < 0.4).float())
    model.eval()
    camera = Cameras(
        camera_to_worlds=torch.tensor(look_at_origin(np.array([0.0, -3.0, 0.0]))[:3, :4], dtype=torch.float32)[None],
        fx=40.0, fy=40.0, cx=24.0, cy=24.0, width=48, height=48,
    )  # fmt: skip
    outputs = model.get_outputs_for_camera(camera)
    assert {"rgb", "rgb_foreground", "rgb_background", "accumulation", "ray_min_sdf"} <= set(outputs)
    corner, centre = (0, 0), (24, 24)  # a corner ray passes beside the unit ball; the centre ray hits the object
    assert float(outputs["accumulation"][corner]) == 0.0 and float(outputs["accumulation"][centre]) > 0.99
    torch.testing.assert_close(outputs["rgb"][corner], outputs["rgb_background"][corner])
    assert float(outputs["rgb_background"][corner].sum()) > 0.1  # the background model's colour, not black
    # The SDF view along the corner ray: the smallest certified distance met, positive (no surface there).
    assert float(outputs["ray_min_sdf"][corner].min()) > 0.0


def test_viewer_panel_on_a_real_capture_meshes_and_slices_the_region_alone() -> None:
    """The certsdf panel on a real capture's model, installed as nerfstudio's viewer does: Extract mesh
    gives the object inside the region (no wall at the region's edge: the grid is empty outside the
    ball), and the SDF slice covers the region's box."""
    from types import SimpleNamespace

    import viser
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

    from certsdf_ns.viewer.controls import CertSDFViewerControls

    model = _region_model()
    with torch.no_grad():
        model.field.geometry.set_occupancy((model.field.geometry.grid_points().norm(dim=-1) < 0.4).float())

    class PipelineLike(torch.nn.Module):  # what the viewer walks: the model and the panel the pipeline owns
        def __init__(self) -> None:
            super().__init__()
            self._model, self.viewer_controls = model, CertSDFViewerControls(model)

        @property
        def model(self):
            return self._model

    pipeline = PipelineLike()
    server = viser.ViserServer(host="127.0.0.1", port=free_port(), verbose=False)
    calls = {"add_mesh_simple": [], "add_image": []}  # what the panel draws, recorded and drawn
    for name, recorded in calls.items():

        def record(*args, _draw=getattr(server.scene, name), _recorded=recorded, **kwargs):
            _recorded.append((args, kwargs))
            return _draw(*args, **kwargs)

        setattr(server.scene, name, record)
    try:
        for _, element in parse_object(pipeline, ViewerElement, "Custom Elements"):
            element.install(server)
        for _, control in parse_object(pipeline, ViewerControl, "Custom Elements"):
            control._setup(SimpleNamespace(viser_server=server, config=SimpleNamespace(websocket_host="127.0.0.1")))
        controls = pipeline.viewer_controls
        controls.c6_mesh_extract.cb_hook(controls.c6_mesh_extract)
        (_, kw), = calls["add_mesh_simple"]
        radii = np.linalg.norm(kw["vertices"] / 10.0, axis=1)  # viser units are world x 10
        voxel = 2.0 / 23
        assert len(kw["faces"]) > 100 and np.abs(radii - 0.4).max() < 2 * voxel  # the object, and nothing at radius 1
        controls.c3_slice_show.gui_handle._impl.value = True
        controls.c3_slice_show.cb_hook(controls.c3_slice_show)
        (_, image), kw = calls["add_image"][-1]
        assert kw["render_width"] == pytest.approx(20.0) and (image.sum(-1) == 0).any()  # the region's box, a zero contour
    finally:
        server.stop()


def test_region_option_moves_the_grid_and_a_bad_radius_is_refused(room_scene: Path, capsys) -> None:
    """--pipeline.datamanager.dataparser.region: the scene box becomes the ball's box (Blender scenes
    have no dataparser transform); a radius <= 0 ends in one message, exit code 2."""
    from certsdf_ns.data.dataparser import CertSDFDataParserConfig

    outputs = CertSDFDataParserConfig(data=room_scene, region=(0.1, 0.2, 0.3, 1.2)).setup().get_dataparser_outputs("train")
    torch.testing.assert_close(outputs.scene_box.aabb, torch.tensor([[-1.1, -1.0, -0.9], [1.3, 1.4, 1.5]]))
    torch.testing.assert_close(outputs.metadata[REGION_KEY], torch.tensor([0.1, 0.2, 0.3, 1.2]))
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=room_scene, region=(0.0, 0.0, 0.0, -1.0)).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    assert "region: the radius must be positive, got -1.0" in " ".join(capsys.readouterr().err.split())
