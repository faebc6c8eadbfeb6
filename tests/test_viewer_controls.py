"""certsdf's viewer panel, driven in-process against a real viser server (no browser).

The elements are discovered and installed exactly as nerfstudio's Viewer does
(``parse_object`` on the pipeline, ``element.install(server)``, ``ViewerControl._setup``);
user input is emulated the way viser delivers it (set the handle's value, run the hook).
The browser test (test_viewer_browser.py) covers the real client end to end.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import viser

from conftest import free_port

from nerfstudio.data.scene_box import SceneBox
from nerfstudio.viewer.utils import parse_object
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

from certsdf_ns.export.mesh import extract_mesh
from certsdf_ns.certified import annealed
from certsdf_ns.method.model import CertSDFModelConfig, SampleBudget
from certsdf_ns.viewer.controls import CertSDFViewerControls

CENTRE = torch.tensor([0.1, 0.0, -0.1])


def make_model():
    cfg = CertSDFModelConfig(
        grid_resolution=32, hash_log2_size=10, hash_max_res=64, hash_levels=4,
        sigma_start_voxels=3.0, sigma_voxels=1.0, sharpness_start_voxels=1.0, sharpness_voxels=0.5, anneal_steps=100,
    )  # fmt: skip
    model = cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])), num_train_data=4)
    geometry = model.field.geometry
    geometry.set_occupancy(((geometry.grid_points() - CENTRE).norm(dim=-1) <= 0.5).float())
    return model


class PipelineLike(torch.nn.Module):
    """What nerfstudio's viewer walks: the pipeline's model and the panel the pipeline owns
    (as :class:`certsdf_ns.pipeline.CertSDFPipeline` does, without data to load)."""

    def __init__(self, model) -> None:
        super().__init__()
        self._model = model
        self.viewer_controls = CertSDFViewerControls(model)

    @property
    def model(self):
        return self._model


def make_pipeline() -> PipelineLike:
    return PipelineLike(make_model())


def train_step(pipeline: PipelineLike, step: int) -> None:
    """One training iteration's callbacks: the model's schedule before, the panel's after."""
    pipeline.model.set_schedule_step(step)
    pipeline.viewer_controls.after_train_step(step)


class Recorder:
    """Wraps a viser scene method: records each call's arguments, then calls through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture()
def attached():
    pipeline = make_pipeline()
    model = pipeline.model
    server = viser.ViserServer(host="127.0.0.1", port=free_port(), verbose=False)
    server.scene.add_image = Recorder(server.scene.add_image)  # type: ignore[method-assign]
    server.scene.add_mesh_simple = Recorder(server.scene.add_mesh_simple)  # type: ignore[method-assign]
    elements = parse_object(pipeline, ViewerElement, "Custom Elements")
    for _, element in elements:
        element.install(server)
    for _, control in parse_object(pipeline, ViewerControl, "Custom Elements"):
        control._setup(SimpleNamespace(viser_server=server, config=SimpleNamespace(websocket_host="127.0.0.1")))
    try:
        yield pipeline, pipeline.viewer_controls, server
    finally:
        server.stop()


def user_sets(element, value) -> None:
    """What viser does when the browser changes a value: update the handle, run the hook."""
    element.gui_handle._impl.value = value
    element.cb_hook(element)


def settle() -> None:
    time.sleep(0.3)  # viser runs callbacks of values set from Python on a worker thread


def test_controls_are_discoverable_in_order_and_inert_without_a_viewer():
    pipeline = make_pipeline()
    model = pipeline.model
    elements = parse_object(pipeline, ViewerElement, "Custom Elements")
    labels = [e.name for _, e in elements]
    assert labels == [
        "Smoothing σ (voxels)", "Sharpness s (voxels)", "Reset σ, s to schedule", "Show SDF slice", "Slice axis",
        "Slice offset", "Extract mesh", "Show mesh", "Fast preview while moving", "certsdf",
    ]  # fmt: skip
    # the pipeline owns the panel: its folder reads "Custom Elements / viewer_controls"
    assert {p.rsplit("/", 1)[0] for p, _ in elements} == {"Custom Elements/viewer_controls"}
    assert len(parse_object(pipeline, ViewerControl, "Custom Elements")) == 1
    assert parse_object(model, ViewerElement, "Custom Elements") == []  # the model holds no viewer element
    # No viewer (ns-eval, ns-export): hooks and training steps run and touch nothing.
    controls = pipeline.viewer_controls
    controls.c3_slice_show.value = True
    for element in (controls.c3_slice_show, controls.c6_mesh_extract, controls.c2_reset):
        element.cb_hook(element)
    model.train()
    train_step(pipeline, 50)
    assert model.field.geometry.sigma == pytest.approx(annealed(3.0, 1.0, 50, 100) * model.voxel)
    assert controls.c0_sigma.value == pytest.approx(annealed(3.0, 1.0, 50, 100))  # default follows the schedule
    # the controls add nothing to checkpoints
    assert not any("viewer_controls" in k for k in pipeline.state_dict())


def test_sigma_slider_overrides_the_schedule_until_reset(attached):
    pipeline, controls, _ = attached
    model = pipeline.model
    model.train()
    train_step(pipeline, 10)
    settle()  # the schedule moved the slider: that echo must not count as a user override
    assert not model.smoothing_overridden
    assert controls.c0_sigma.value == pytest.approx(annealed(3.0, 1.0, 10, 100), abs=0.03)

    before = model.field.geometry.sdf_grid().clone()
    user_sets(controls.c0_sigma, 4.0)
    assert model.field.geometry.sigma == pytest.approx(4.0 * model.voxel)
    after = model.field.geometry.sdf_grid()
    assert not torch.allclose(before, after)  # re-smoothed at once
    assert float(after.max()) == pytest.approx(model.field.geometry.max_distance, rel=1e-4)

    user_sets(controls.c1_sharpness, 2.0)
    for step in (11, 50, 99):  # training goes on with the user's σ and s
        train_step(pipeline, step)
        assert model.field.geometry.sigma == pytest.approx(4.0 * model.voxel)
        assert model.field.sharpness == pytest.approx(2.0 * model.voxel)
    assert "override" in controls.c9_status.value

    controls.c2_reset.cb_hook(controls.c2_reset)
    settle()
    assert model.field.geometry.sigma == pytest.approx(annealed(3.0, 1.0, 99, 100) * model.voxel)
    assert model.field.sharpness == pytest.approx(annealed(1.0, 0.5, 99, 100) * model.voxel)
    assert controls.c0_sigma.value == pytest.approx(annealed(3.0, 1.0, 99, 100), abs=0.03)
    assert not model.smoothing_overridden
    train_step(pipeline, 100)
    assert model.field.geometry.sigma == pytest.approx(1.0 * model.voxel)


def test_slice_plane_is_drawn_in_viser_units_and_follows_training(attached):
    pipeline, controls, server = attached
    model = pipeline.model
    add_image = server.scene.add_image
    user_sets(controls.c4_slice_axis, "x")
    user_sets(controls.c5_slice_offset, 0.5)
    assert add_image.calls == []  # nothing drawn while the checkbox is off
    user_sets(controls.c3_slice_show, True)
    (name, image), kw = add_image.calls[-1]
    assert name == "/certsdf/sdf_slice" and image.dtype == np.uint8 and image.shape == (256, 256, 3)
    assert kw["render_width"] == pytest.approx(20.0) and kw["render_height"] == pytest.approx(20.0)  # 2 world units ×10
    assert np.allclose(kw["position"], [5.0, 0.0, 0.0])  # x = 0.5 world units
    rotation = viser.transforms.SO3(np.asarray(kw["wxyz"])).as_matrix()
    assert np.allclose(rotation[:, 2], [1.0, 0.0, 0.0], atol=1e-6)  # plane normal along x
    assert (image.sum(-1) == 0).any()  # the plane cuts the ball: zero contour drawn

    model.train()
    n = len(add_image.calls)
    train_step(pipeline, 51)
    assert len(add_image.calls) == n  # not a redraw step
    train_step(pipeline, 100)
    assert len(add_image.calls) == n + 1  # redrawn while training

    user_sets(controls.c3_slice_show, False)
    assert controls._slice_handle.visible is False


def test_extract_mesh_adds_the_zero_level_set_to_the_scene(attached):
    pipeline, controls, server = attached
    model = pipeline.model
    train_step(pipeline, 100)  # σ = 1 voxel: the smoothed level stays within a voxel of the ball
    controls.c6_mesh_extract.cb_hook(controls.c6_mesh_extract)
    (name,), kw = server.scene.add_mesh_simple.calls[-1]
    expected = extract_mesh(model.field.geometry, resolution=0)  # the one extractor, on the node SDF
    expected_vertices, expected_faces = expected.vertices, expected.faces
    assert name == "/certsdf/mesh"
    assert np.allclose(kw["vertices"], expected_vertices * 10.0)  # viser units = world ×10
    assert np.array_equal(kw["faces"], expected_faces) and len(expected_faces) > 100
    radii = np.linalg.norm(kw["vertices"] / 10.0 - CENTRE.numpy(), axis=1)
    assert np.abs(radii - 0.5).max() < 2.0 / 31  # within a voxel of the ball
    assert f"{len(expected_vertices)} vertices" in controls.c9_status.value and "σ=1.00 vox" in controls.c9_status.value
    user_sets(controls.c7_mesh_show, False)
    assert controls._mesh_handle.visible is False


def run_in_render_thread(fn, state: str):
    """Run ``fn`` on a thread that is a nerfstudio RenderStateMachine in ``state``."""
    import threading

    from nerfstudio.viewer.render_state_machine import RenderStateMachine

    result = {}

    class RenderThread(RenderStateMachine):
        def __init__(self) -> None:  # no viewer needed: only the thread type and state matter
            threading.Thread.__init__(self)
            self.state = state

        def run(self) -> None:
            result["value"] = fn()

    thread = RenderThread()
    thread.start()
    thread.join(timeout=120)
    return result["value"]


def test_fast_preview_only_for_the_moving_camera_render(attached):
    pipeline, controls, _ = attached
    model = pipeline.model
    full = SampleBudget(64, 32, 8)
    assert model.sample_budget() == full  # the configured budget, through the panel's hook
    assert run_in_render_thread(model.sample_budget, "low_move") == SampleBudget(32, 16, 3)
    assert run_in_render_thread(model.sample_budget, "high") == full
    user_sets(controls.c8_fast_preview, False)
    assert run_in_render_thread(model.sample_budget, "low_move") == full
    user_sets(controls.c8_fast_preview, True)

    # a real render through the model in the preview: fewer samples, same outputs
    from nerfstudio.cameras.cameras import Cameras

    from certsdf_ns.data.scenes import look_at_origin

    c2w = torch.tensor(look_at_origin(np.array([0.0, -3.0, 0.5]))[:3, :4], dtype=torch.float32)
    camera = Cameras(fx=20.0, fy=20.0, cx=12.0, cy=12.0, width=24, height=24, camera_to_worlds=c2w[None])
    model.eval()
    full_out = model.get_outputs_for_camera(camera)
    preview = run_in_render_thread(lambda: model.get_outputs_for_camera(camera), "low_move")
    assert set(preview) == set(full_out) >= {"rgb", "depth", "normals", "ray_min_sdf", "ray_min_sdf_rgb"}
    assert preview["num_colour_samples"].max() <= 3
    hit = full_out["accumulation"][..., 0] > 0.5
    assert 0 < hit.sum() < hit.numel()  # the ball is in view, and not everywhere
    assert ((preview["accumulation"][..., 0] > 0.5) == hit).float().mean() > 0.97  # same silhouette


def test_warns_when_the_viewer_listens_beyond_localhost(capsys):
    pipeline = make_pipeline()
    server = SimpleNamespace(on_client_connect=lambda cb: cb)
    pipeline.viewer_controls.viewer_control._setup(
        SimpleNamespace(viser_server=server, config=SimpleNamespace(websocket_host="0.0.0.0"))
    )
    out = capsys.readouterr().out
    assert "[certsdf] warning: the viewer listens on 0.0.0.0" in out and "--viewer.websocket-host 127.0.0.1" in out
