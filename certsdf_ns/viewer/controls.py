"""certsdf's panel in nerfstudio's viser viewer: live σ / s, an SDF slice, a quick mesh.

nerfstudio's viewer finds GUI elements by walking the pipeline's attributes, descending only
into ``nn.Module`` attributes (``nerfstudio.viewer.utils.parse_object``). So the controls
live on :class:`CertSDFViewerControls`, an ``nn.Module`` with no parameters (nothing enters
checkpoints) owned by the pipeline (:class:`certsdf_ns.pipeline.CertSDFPipeline`) as
``pipeline.viewer_controls``; the viewer installs them under "Custom Elements /
viewer_controls" and calls ``ViewerControl._setup`` on ``viewer_control``, which hands us the
viser server for scene objects.

The panel drives the model through a narrow interface and nothing else: ``set_smoothing`` /
``reset_smoothing`` (an override of σ and s that the schedule respects until reset),
``field.smoothing_voxels()`` to show the current values, and ``set_sample_budget_hook`` for
the moving-camera preview. The model knows nothing of the panel.

The same object exists in ``ns-eval`` / ``ns-export`` and in unit tests, where no viewer
ever attaches: every method then leaves the scene alone (``_server()`` is None).

Threading: the viewer runs element callbacks on viser's worker threads *inside* the
training lock (the same lock the trainer holds for a whole iteration and the render thread
holds while rendering), so a callback may change σ or read the grid without racing either.
``after_train_step`` runs on the training thread, as a training callback.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import viser.transforms as vtf
from torch import nn

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.viewer.render_state_machine import RenderStateMachine
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerControl,
    ViewerDropdown,
    ViewerSlider,
    ViewerText,
)

from certsdf_ns import console
from certsdf_ns.export.mesh import NoSurfaceError, extract_mesh
from certsdf_ns.method.model import CertSDFModel, SampleBudget
from certsdf_ns.viewer.sdf_views import AXES, sdf_slice, sdf_slice_image

SLICE_NODE = "/certsdf/sdf_slice"
MESH_NODE = "/certsdf/mesh"


@dataclass
class ViewerControlsConfig:
    """Settings of certsdf's viewer panel (`--pipeline.viewer-panel.*`)."""

    slice_every: int = 50
    """While training, redraw a visible SDF slice every this many steps."""
    slice_pixels: int = 256
    """Pixels along the longer side of the slice image."""
    sigma_range_voxels: Tuple[float, float] = (0.25, 6.0)
    """Range of the σ slider (voxels); widened to include the configured schedule."""
    sharpness_range_voxels: Tuple[float, float] = (0.05, 3.0)
    """Range of the sharpness slider (voxels); widened to include the configured schedule."""
    mesh_colour: Tuple[int, int, int] = (230, 200, 120)
    """RGB colour of the extracted mesh."""
    preview_coarse_samples: int = 32
    """Uniform samples per ray in the viewer's preview renders while the camera moves."""
    preview_fine_samples: int = 16
    """PDF samples per ray in those preview renders."""
    preview_colour_samples: int = 3
    """At most this many colour-network samples per ray in those preview renders."""
    cpu_max_res: int = 128
    """Without CUDA, the viewer's "Max res" at start-up, in pixels (nerfstudio's 512 stalls training); 0 keeps 512."""
    start_at_train_camera: bool = True
    """Open each new browser tab at the first training camera, orbiting the scene box centre."""


VISER_SCALE = float(VISER_NERFSTUDIO_SCALE_RATIO)
"""nerfstudio draws the world ×10 in viser (cameras, crop box, clicks all use this)."""


class _AttachHook(ViewerControl):
    """nerfstudio's ViewerControl, plus a callback once the viewer has set it up."""

    def __init__(self, on_attach: Callable[[], None]) -> None:
        self._on_attach = on_attach

    def _setup(self, viewer: Any) -> None:
        super()._setup(viewer)
        self._on_attach()


class CertSDFViewerControls(nn.Module):
    """GUI elements (attribute names are prefixed ``cN_`` because the viewer installs them in
    alphabetical order of attribute name) and the logic behind them."""

    def __init__(self, model: CertSDFModel, config: Optional[ViewerControlsConfig] = None) -> None:
        super().__init__()
        # A weak reference: a strong one would make the model a submodule of the panel, and the
        # viewer (which walks the pipeline) would reach the model's elements twice.
        self._model = weakref.ref(model)
        self._cfg = config or ViewerControlsConfig()
        self._shown: Dict[str, float] = {}  # last value written to each slider by code
        self._slice_handle: Any = None
        self._mesh_handle: Any = None

        mcfg = model.config
        sig_lo, sig_hi = self._cfg.sigma_range_voxels
        sig_lo = min(sig_lo, mcfg.sigma_voxels, mcfg.sigma_start_voxels)
        sig_hi = max(sig_hi, mcfg.sigma_voxels, mcfg.sigma_start_voxels)
        s_lo, s_hi = self._cfg.sharpness_range_voxels
        s_lo = min(s_lo, mcfg.sharpness_voxels, mcfg.sharpness_start_voxels)
        s_hi = max(s_hi, mcfg.sharpness_voxels, mcfg.sharpness_start_voxels)

        self.viewer_control = _AttachHook(self._on_attach)
        self.c0_sigma = ViewerSlider(
            "Smoothing σ (voxels)", float(mcfg.sigma_start_voxels), sig_lo, sig_hi, 0.05,
            cb_hook=self._on_sigma,
            hint="Randomized-smoothing σ. Moving it re-smooths the grid at once and overrides the schedule "
            "(training continues with this σ) until 'Reset σ, s to schedule'.",
        )  # fmt: skip
        self.c1_sharpness = ViewerSlider(
            "Sharpness s (voxels)", float(mcfg.sharpness_start_voxels), s_lo, s_hi, 0.05,
            cb_hook=self._on_sharpness,
            hint="s in density = −30·ln(1+ε−sigmoid(−sdf/s)). Overrides the schedule like σ.",
        )  # fmt: skip
        self.c2_reset = ViewerButton("Reset σ, s to schedule", cb_hook=self._on_reset)
        self.c3_slice_show = ViewerCheckbox(
            "Show SDF slice", False, cb_hook=self._on_slice_change,
            hint="Axis-aligned plane coloured by the certified SDF (red inside, blue outside, black: zero level, "
            "grey lines every σ). Redrawn while training.",
        )  # fmt: skip
        self.c4_slice_axis = ViewerDropdown("Slice axis", "z", list(AXES), cb_hook=self._on_slice_change)
        self.c5_slice_offset = ViewerSlider(
            "Slice offset", 0.0, -1.0, 1.0, 0.01, cb_hook=self._on_slice_change,
            hint="Position of the slice across the scene box: −1 = min face, 0 = centre, 1 = max face.",
        )  # fmt: skip
        self.c6_mesh_extract = ViewerButton("Extract mesh", cb_hook=self._on_extract_mesh)
        self.c7_mesh_show = ViewerCheckbox("Show mesh", True, cb_hook=self._on_mesh_visibility)
        self.c8_fast_preview = ViewerCheckbox(
            "Fast preview while moving", True,
            hint=f"While the camera moves, render with {self._cfg.preview_coarse_samples}+{self._cfg.preview_fine_samples} "
            f"samples and ≤{self._cfg.preview_colour_samples} colour samples per ray; the still frame uses the full budget.",
        )  # fmt: skip
        self.c9_status = ViewerText("certsdf", "σ, s follow the schedule", disabled=True)

    # -- helpers ---------------------------------------------------------------------------
    def _owner(self) -> "CertSDFModel":
        # Not a public attribute or property: the viewer's parse_object follows every public
        # nn.Module attribute, and reaching the model again from here would recurse forever.
        model = self._model()
        assert model is not None, "the model owning these viewer controls is gone"
        return model

    def _server(self) -> Any:
        """The viser server once a viewer has attached, else None (ns-eval, ns-export, tests)."""
        return getattr(self.viewer_control, "viser_server", None)

    def _set_status(self, text: str) -> None:
        self.c9_status.value = text

    def _show(self, key: str, element: ViewerSlider, value: float) -> None:
        """Write a value to a slider from code (so its callback can tell it from a user move)."""
        value = float(min(max(value, element.min), element.max))
        if key in self._shown and abs(self._shown[key] - value) < 0.5 * element.step:
            return  # unchanged at slider precision: no message, no re-render
        self._shown[key] = value
        element.value = value

    def _is_echo(self, key: str, element: ViewerSlider) -> bool:
        # viser runs on_update callbacks for values set from Python too (asynchronously).
        return key in self._shown and abs(float(element.value) - self._shown[key]) < 1e-9

    def sample_budget(self, configured: SampleBudget) -> SampleBudget:
        """The model's budget hook: its own budget, except in the viewer's moving-camera preview,
        which nerfstudio renders at low resolution and replaces with a full render once the
        camera rests; there, frame rate matters more than detail."""
        if self._server() is None or not self.c8_fast_preview.value:
            return configured
        thread = threading.current_thread()
        if isinstance(thread, RenderStateMachine) and thread.state == "low_move":
            cfg = self._cfg
            return SampleBudget(
                min(configured.coarse, cfg.preview_coarse_samples),
                min(configured.fine, cfg.preview_fine_samples),
                min(configured.colour, cfg.preview_colour_samples),
            )
        return configured

    # -- σ and s ------------------------------------------------------------------------------
    def training_callbacks(self) -> List[TrainingCallback]:
        """What the pipeline adds to the model's callbacks: follow training with the panel."""
        return [
            TrainingCallback(
                where_to_run=[TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                update_every_num_iters=1,
                func=self.after_train_step,
            )
        ]

    def after_train_step(self, step: int) -> None:
        """Show the σ and s the model trains with; redraw a visible slice every few steps."""
        self.show_smoothing()
        if self._cfg.slice_every > 0 and step % self._cfg.slice_every == 0:
            self.refresh_slice()

    def show_smoothing(self) -> None:
        """Move the sliders to the model's current σ and s (the schedule's, or the override)."""
        sigma, sharpness = self._owner().field.smoothing_voxels()
        self._show("sigma", self.c0_sigma, sigma)
        self._show("sharpness", self.c1_sharpness, sharpness)

    def _describe(self) -> str:
        model = self._owner()
        sigma, sharp = model.field.smoothing_voxels()
        mode = "override" if model.smoothing_overridden else "schedule"
        return f"σ={sigma:.2f} vox, s={sharp:.2f} vox ({mode}), step {model.step or 0}"

    def _on_sigma(self, element: ViewerSlider) -> None:
        self._on_smoothing_slider("sigma", "σ", element)

    def _on_sharpness(self, element: ViewerSlider) -> None:
        self._on_smoothing_slider("sharpness", "sharpness", element)

    def _on_smoothing_slider(self, key: str, label: str, element: ViewerSlider) -> None:
        """A user moved the σ or s slider: override the schedule with that value."""
        if self._is_echo(key, element):
            return
        value = float(element.value)
        self._shown[key] = value
        self._owner().set_smoothing(**{f"{key}_voxels": value})
        console.log(f"viewer: {label} set to {value:.2f} voxels (schedule overridden)")
        self._set_status(self._describe())
        if key == "sigma":  # σ re-smooths the grid; s changes only how it renders
            self.refresh_slice()

    def _on_reset(self, _: ViewerButton) -> None:
        model = self._owner()
        model.reset_smoothing()
        self.show_smoothing()
        console.log(f"viewer: σ and s follow the schedule again (step {model.step or 0})")
        self._set_status(self._describe())
        self.refresh_slice()

    # -- SDF slice ----------------------------------------------------------------------------
    def _on_slice_change(self, _: Any) -> None:
        self.refresh_slice(log=True)

    def refresh_slice(self, log: bool = False) -> None:
        """Draw (or hide) the slice plane according to the checkbox, axis and offset."""
        server = self._server()
        if server is None:
            return
        if not self.c3_slice_show.value:
            if self._slice_handle is not None:
                self._slice_handle.visible = False
            return
        geometry = self._owner().field.geometry
        axis = AXES.index(self.c4_slice_axis.value)
        values, plane = sdf_slice(geometry, axis, float(self.c5_slice_offset.value), self._cfg.slice_pixels)
        image = sdf_slice_image(values, geometry.max_distance, iso_step=geometry.sigma)
        scale = VISER_SCALE
        self._slice_handle = server.scene.add_image(
            SLICE_NODE,
            image,
            render_width=plane.width * scale,
            render_height=plane.height * scale,
            format="png",  # lossless: keeps the one-pixel zero contour sharp
            wxyz=vtf.SO3.from_matrix(plane.rotation).wxyz,
            position=plane.centre * scale,
        )
        if log:
            inside = float((values < 0).float().mean())
            console.log(
                f"viewer: SDF slice {self.c4_slice_axis.value}={self.c5_slice_offset.value:+.2f} drawn "
                f"({image.shape[1]}x{image.shape[0]} px, sdf in [{float(values.min()):.3f}, {float(values.max()):.3f}], "
                f"{100 * inside:.1f}% inside)"
            )

    # -- mesh ---------------------------------------------------------------------------------
    def _on_extract_mesh(self, _: ViewerButton) -> None:
        server = self._server()
        if server is None:
            return
        model = self._owner()
        try:
            mesh = extract_mesh(model.field.geometry, resolution=0)  # the node SDF itself: fastest
        except NoSurfaceError:
            if self._mesh_handle is not None:
                self._mesh_handle.remove()
                self._mesh_handle = None
            self._set_status("mesh: no zero crossing yet")
            console.log("viewer: mesh extraction found no zero crossing")
            return
        self._mesh_handle = server.scene.add_mesh_simple(
            MESH_NODE,
            vertices=np.asarray(mesh.vertices, dtype=np.float32) * VISER_SCALE,
            faces=np.asarray(mesh.faces, dtype=np.int32),
            color=self._cfg.mesh_colour,
            side="double",  # open where the surface leaves the box
            visible=bool(self.c7_mesh_show.value),
        )
        sigma, _ = model.field.smoothing_voxels()
        msg = f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces (σ={sigma:.2f} vox, step {model.step or 0})"
        self._set_status(msg)
        console.log(f"viewer: {msg}")

    def _on_mesh_visibility(self, element: ViewerCheckbox) -> None:
        if self._mesh_handle is not None:
            self._mesh_handle.visible = bool(element.value)

    # -- viewer attachment --------------------------------------------------------------------
    def _on_attach(self) -> None:
        self._owner().set_sample_budget_hook(self.sample_budget)
        self.show_smoothing()
        self._set_status(self._describe())
        panel = getattr(self.viewer_control.viewer, "control_panel", None)
        max_res = getattr(panel, "_max_res", None)  # nerfstudio 1.1.5's "Max res" slider
        if self._cfg.cpu_max_res > 0 and not torch.cuda.is_available() and max_res is not None:
            max_res.value = min(int(max_res.value), self._cfg.cpu_max_res)
            console.log(f"viewer: no CUDA, 'Max res' set to {max_res.value} px (raise it in Render Options)")
        if self._cfg.start_at_train_camera:
            self.viewer_control.viser_server.on_client_connect(self._start_view)
        console.log("viewer: controls attached (Custom Elements / model / viewer_controls)")
        # ns-viewer's own default host is 0.0.0.0 whatever the saved config says: say so.
        host = self.viewer_control.viewer.config.websocket_host
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.log(
                f"warning: the viewer listens on {host}; anyone on the network can "
                "control training. Pass --viewer.websocket-host 127.0.0.1 to keep it local."
            )

    def _start_view(self, client: Any) -> None:
        """Put a new client's camera where the first training camera is, looking at the box centre.

        A browser can connect before the viewer has drawn the training cameras (``init_scene``
        runs after the server starts), so wait for them on a helper thread, for a while.
        """
        threading.Thread(target=self._start_view_when_ready, args=(client,), daemon=True).start()

    def _start_view_when_ready(self, client: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not getattr(self.viewer_control.viewer, "camera_handles", None):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        handles = self.viewer_control.viewer.camera_handles
        first = handles[min(handles)]
        centre = self._owner().field.geometry.aabb.mean(dim=0).cpu().numpy() * VISER_SCALE
        # viser cameras follow OpenCV (y down), so the image's up is −y of the camera frame.
        up = vtf.SO3(np.asarray(first.wxyz)).as_matrix() @ np.array([0.0, -1.0, 0.0])
        # A little behind the training camera: standing exactly on it puts the eye inside its
        # frustum drawing, whose image then covers the view.
        position = centre + 1.15 * (np.asarray(first.position) - centre)
        with client.atomic():
            client.camera.up_direction = up
            client.camera.position = position
            client.camera.look_at = centre
