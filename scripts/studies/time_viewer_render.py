"""Time certsdf renders the way nerfstudio's viewer makes them.

Same camera maths (``get_camera`` from a ``CameraState`` at the first training camera), no_grad,
the SetTrace interrupt hook, and a RenderStateMachine thread in the given state, so the
"Fast preview while moving" budget applies exactly as in the viewer.

    .venv/bin/python scripts/studies/time_viewer_render.py outputs/.../config.yml [certified|uniform]

The optional second argument picks the sampler (default: the run's own).

Sizes: 53x30 is the viewer's smallest preview (30 px tall at 16:9; on CPU nerfstudio's
adaptive preview always ends there), 128x72 the still frame at certsdf's CPU "Max res",
512x288 the still frame at nerfstudio's default "Max res".
"""

import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from nerfstudio.cameras.cameras import CameraType
from nerfstudio.utils.eval_utils import eval_setup
from nerfstudio.viewer.render_state_machine import RenderStateMachine
from nerfstudio.viewer.utils import CameraState, get_camera
from nerfstudio.viewer_legacy.server import viewer_utils

SIZES = [(30, 53, "low_move", 5), (30, 53, "low_static", 5), (72, 128, "high", 3), (288, 512, "high", 1)]
"""(height, width, render state, repetitions) of each timed render."""


def in_thread(fn, state):
    """fn() on a RenderStateMachine thread in `state` (the preview budget reads the thread's state)."""
    out = {}

    class T(RenderStateMachine):
        def __init__(self):
            threading.Thread.__init__(self)
            self.state = state

        def run(self):
            out["v"] = fn()

    t = T()
    t.start()
    t.join()
    return out["v"]


def render(model, c2w, fov: float, h: int, w: int, state: str):
    """(seconds, outputs) of one viewer-style render of h x w pixels."""
    cam = get_camera(CameraState(fov=fov, aspect=w / h, c2w=c2w, camera_type=CameraType.PERSPECTIVE), h, w)

    def go():
        t = time.perf_counter()
        with torch.no_grad(), viewer_utils.SetTrace(lambda f, e, a: None):
            out = model.get_outputs_for_camera(cam)
        return time.perf_counter() - t, out

    return in_thread(go, state)


def main() -> None:
    _, pipeline, _, step = eval_setup(Path(sys.argv[1]), test_mode="test")
    model = pipeline.model.eval()
    if len(sys.argv) > 2:
        model.config.sampler = sys.argv[2]
    pipeline.viewer_controls.viewer_control.viser_server = object()  # as if a viewer were attached
    model.set_sample_budget_hook(pipeline.viewer_controls.sample_budget)
    cams = pipeline.datamanager.train_dataset.cameras
    c2w = cams.camera_to_worlds[0]
    fov = float(2 * math.atan(float(cams.cy[0]) / float(cams.fy[0])))
    print(f"checkpoint step {step}, torch threads {torch.get_num_threads()}, grid {model.config.grid_resolution}, sampler {model.config.sampler}")
    render(model, c2w, fov, 30, 53, "low_move")
    for h, w, state, reps in SIZES:
        la = os.getloadavg()[0]
        runs = [render(model, c2w, fov, h, w, state)[0] for _ in range(reps)]
        best, med = min(runs), sorted(runs)[len(runs) // 2]
        print(f"{w}x{h} ({w*h} rays) state={state}: best {best*1000:.0f} ms, median {med*1000:.0f} ms -> {1/med:.1f} fps, {w*h/med:.0f} rays/s (load {la:.1f})")


if __name__ == "__main__":
    main()
