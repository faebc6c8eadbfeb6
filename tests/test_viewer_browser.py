"""The live viewer in a real browser: `ns-train certsdf --vis viewer` and `ns-viewer`, driven by
headless Chromium through playwright.

Checks, through the real CLIs: the viewer binds 127.0.0.1 by default; its web client is served
entirely by the local viser server (every off-host request is blocked and the page still
works); certsdf's controls appear; rendered frames arrive (the canvas shows the model's
pictures, and the SDF output view changes them); clicking the controls has their effect
(log lines from the process, the status field, the picture). Every wait is bounded, and the
viewer process is killed in a ``finally``.

Needs Debian's chromium (/usr/bin/chromium, installed by certsdf_ns/scripts/setup_env.sh)
and playwright from PyPI (the `dev` extra); no browser download.
Screenshots go to the folder printed at the start of each test.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_TRAIN_ARGS, TrainedRun, free_port, ns
from forked_cli import ForkedProcess, forkable

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 720}
# The 3D canvas: left of the 320 px control panel, below the 51 px title bar.
CANVAS = (slice(60, 710), slice(10, 950))
CENTRE = (slice(220, 560), slice(300, 660))
STARTUP_S = 240  # a cold nerfstudio import on 2 busy cores can take minutes
STEP_S = 90  # any single wait for the viewer after that

# func_only: the bound is for the test body; the shared trained_run fixture (a 300-step
# ns-train, reused by the other end-to-end tests) is not part of this test's cost.
pytestmark = pytest.mark.timeout(600, func_only=True)


class ViewerProcess:
    """A CLI that serves the viewer, with its output in a log file we can poll."""

    def __init__(self, args, log: Path, port: int) -> None:
        self.log, self.port = log, port
        args = [str(a) for a in args]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        target = forkable(args, env)
        # Own session: the kill in stop() reaches anything it spawns, and only that. A forked console
        # script writes its log line by line; a real subprocess is told to by PYTHONUNBUFFERED.
        if target is not None:
            self.proc = ForkedProcess(target, args, log.parent, env, log=log, new_session=True)
            self._log_file = None
        else:
            self._log_file = open(log, "w")
            self.proc = subprocess.Popen(
                args, stdout=self._log_file, stderr=subprocess.STDOUT, env=dict(env, PYTHONUNBUFFERED="1"),
                cwd=log.parent, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"viewer process exited early:\n{self.output()[-4000:]}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(1.0)
        raise AssertionError(f"viewer never listened on port {self.port}:\n{self.output()[-4000:]}")

    def wait_log(self, pattern: str, after: int = 0) -> re.Match:
        match = None

        def found() -> bool:
            nonlocal match
            match = re.search(pattern, self.output()[after:])
            return match is not None

        wait_until(found, STEP_S, f"log line /{pattern}/", self)
        assert match is not None
        return match

    def listening_addresses(self) -> set:
        import psutil

        conns = psutil.Process(self.proc.pid).net_connections(kind="inet")
        return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port}

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()


def wait_until(predicate, timeout: float, what: str, process: ViewerProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"viewer process died while waiting for {what}:\n{process.output()[-4000:]}")
        if predicate():
            return
        time.sleep(0.5)
    tail = process.output()[-3000:] if process is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def clearly_changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Canvas mask of pixels that changed by more than 32 levels in some channel."""
    return np.abs(after[CANVAS] - before[CANVAS]).max(axis=-1) > 32


class Browser:
    """Headless Chromium on the viewer page; every request off 127.0.0.1 is blocked and recorded."""

    def __init__(self, pw, port: int, shots: Path) -> None:
        self.shots, self.blocked, self.local = shots, [], []
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(STEP_S * 1000)
        self.page.route("**/*", self._route)
        self.page.goto(f"http://127.0.0.1:{port}", wait_until="load")

    def _route(self, route) -> None:
        url = route.request.url
        if urlparse(url).hostname in ("127.0.0.1", "localhost"):
            self.local.append(url)
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def text(self) -> str:
        return self.page.inner_text("body")

    def resolution(self) -> tuple[int, int]:
        m = re.search(r"Resolution: (\d+)\D(\d+)px", self.text())
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def shot(self, name: str) -> np.ndarray:
        png = self.page.screenshot(path=str(self.shots / f"{name}.png"))
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)

    def wait_frame(self, process: ViewerProcess) -> None:
        wait_until(lambda: min(self.resolution()) > 0, STEP_S, "a rendered frame (stats 'Resolution')", process)

    def wait_new_picture(self, before: np.ndarray, name: str, process: ViewerProcess, min_fraction: float):
        """Screenshot until at least ``min_fraction`` of the canvas pixels differ clearly (by more
        than 32 levels in some channel) from ``before``; return the picture once it has settled.

        A count of clearly changed pixels, not a mean difference: a small object (the mesh of the
        tiny scene covers ~1% of the canvas) moves the canvas mean by less than one grey level,
        so a threshold on the mean flaked with the object's size on screen. The viewer also
        refines each view progressively (a coarse preview, then full resolution), which changes
        a few percent of the pixels by itself: callers compare against settled pictures, and
        ask for a large fraction where the whole view must change (another output type)."""

        def changed() -> bool:
            return float(clearly_changed(before, self.shot(name)).mean()) >= min_fraction

        wait_until(changed, STEP_S, f"the canvas to change ({name})", process)
        return self.stable_shot(name, process)

    def stable_shot(self, name: str, process: ViewerProcess, quiet_s: float = 3.0) -> np.ndarray:
        """Screenshot once the picture has not changed for ``quiet_s`` seconds (a coarse preview
        can stay up for a second or two before the full-resolution frame replaces it)."""
        shots = [self.shot(name)]
        quiet_since = time.monotonic()

        def settled() -> bool:
            nonlocal quiet_since
            time.sleep(0.5)
            shots.append(self.shot(name))
            if float(np.abs(shots[-1][CANVAS] - shots[-2][CANVAS]).mean()) >= 0.3:
                quiet_since = time.monotonic()
            return time.monotonic() - quiet_since >= quiet_s

        wait_until(settled, STEP_S, f"the picture to settle ({name})", process)
        return shots[-1]

    def select_output(self, name: str) -> None:
        self.page.get_by_label("Output type", exact=True).click()
        self.page.get_by_role("option", name=name, exact=True).click()

    def row(self, label: str):
        """The GUI row (label + input) of a viser element; not every input is tied to its label."""
        return self.page.locator(
            f'xpath=//label[normalize-space()="{label}"]/ancestor::div[contains(@class,"mantine-Flex-root")][1]'
        )

    def set_slider(self, label: str, value: float) -> None:
        box = self.row(label).locator("input.mantine-NumberInput-input")
        box.fill(str(value))
        box.press("Enter")

    def status(self) -> str:
        return self.row("certsdf").locator("input").input_value()

    def close(self) -> None:
        self.browser.close()


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "viewer_screenshots"
    folder.mkdir()
    print(f"\n[viewer test] screenshots and logs in {folder}")
    return folder


def certsdf_controls_shown(browser: Browser) -> bool:
    text = browser.text()
    return all(
        label in text
        for label in ("Smoothing σ (voxels)", "Sharpness s (voxels)", "Reset σ, s to schedule", "Show SDF slice",
                      "Slice axis", "Slice offset", "Extract mesh", "Show mesh")
    )  # fmt: skip


def check_offline(browser: Browser) -> None:
    """The client (page, script bundle, styles) came from the local server, and nothing needed
    from the internet was missed: the page connected and works with all off-host requests blocked."""
    assert any(u.endswith(".js") for u in browser.local) and any(u.endswith(".css") for u in browser.local)
    # What the client tries to fetch from the internet is decoration only: viser's analytics
    # tag and nerfstudio's title-bar logo.
    for url in browser.blocked:
        host = urlparse(url).hostname or ""
        assert host.endswith(("googletagmanager.com", "nerf.studio")), f"unexpected off-host request {url}"


def changed_colour(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Mean RGB, in ``after``, of the canvas pixels that clearly changed since ``before``."""
    return after[CANVAS][clearly_changed(before, after)].mean(axis=0)


def check_canvas_rendered(picture: np.ndarray) -> None:
    """The canvas shows a rendered frame, not viser's empty dark scene: certsdf composites its
    renders on a white evaluation background, so the canvas turns light."""
    assert picture[CANVAS].mean() > 120, picture[CANVAS].mean()


def test_train_viewer_in_browser(tiny_scene: Path, shots: Path):
    """Live during `ns-train` (the model is barely trained: these checks do not need a surface)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = ViewerProcess(
        [
            ns("ns-train"), "certsdf", "--data", tiny_scene, "--output-dir", shots / "outputs",
            "--experiment-name", "viewer", "--timestamp", "t", "--vis", "viewer",
            "--viewer.websocket-port", port, "--viewer.quit-on-train-completion", "True",
            "--viewer.max-num-display-images", "8", "--max-num-iterations", "100000",
            *TINY_TRAIN_ARGS, "--pipeline.datamanager.train-num-rays-per-batch", "512",
            # The σ check below needs the young model's visible fog: at the default s = 0.25 voxel
            # the initial occupancy renders almost no density, so there is nothing for σ to thin;
            # and the unbiased map renders uniform fog transparent (its opacity comes from SDF
            # differences along a ray), so the paper map keeps the fog visible after its warm-up.
            "--pipeline.model.sigma-start-voxels", "1.5", "--pipeline.model.sigma-voxels", "1.5",
            "--pipeline.model.sharpness-start-voxels", "0.5", "--pipeline.model.sharpness-voxels", "0.5",
            "--pipeline.model.density-map", "paper",
        ],
        shots / "ns-train.log", port,
    )  # fmt: skip
    try:
        proc.wait_listening()
        # The method config binds 127.0.0.1 (nerfstudio's default is 0.0.0.0).
        assert proc.listening_addresses() == {"127.0.0.1"}
        assert f"http://127.0.0.1:{port}" in proc.output()

        with sync_playwright() as pw:
            browser = Browser(pw, port, shots)
            wait_until(lambda: certsdf_controls_shown(browser), STEP_S, "certsdf's controls in the page", proc)
            proc.wait_log(r"\[certsdf\] viewer: controls attached")
            proc.wait_log(r"\[certsdf\] viewer: no CUDA, 'Max res' set to 128 px")
            browser.wait_frame(proc)
            check_offline(browser)
            # A frame was rendered while training. Pause it now (nerfstudio's own button): the
            # checks below compare settled pictures, and a training model keeps moving the SDF
            # view's colours (its picture never settled within 90 s once in CI). Every control
            # below acts through its own callback and re-render, paused or not.
            browser.page.get_by_role("button", name="Pause Training", exact=True).click()
            wait_until(
                lambda: browser.page.get_by_role("button", name="Resume Training", exact=True).is_visible(),
                STEP_S, "the 'Resume Training' button", proc,
            )  # fmt: skip
            rgb = browser.stable_shot("1_rgb", proc)
            check_canvas_rendered(rgb)

            # σ slider: re-smooths at once and overrides the schedule; in the young model's fog
            # (sdf ≈ 1.2σ everywhere) a larger σ means a larger SDF, less density, less fog.
            mark = len(proc.output())
            browser.set_slider("Smoothing σ (voxels)", 4.0)
            proc.wait_log(r"viewer: σ set to 4\.00 voxels \(schedule overridden\)", after=mark)
            wait_until(lambda: "(override)" in browser.status(), STEP_S, "status to show the override", proc)
            thinner = browser.wait_new_picture(rgb, "2_sigma_4", proc, min_fraction=0.01)
            assert thinner[CANVAS].mean() > rgb[CANVAS].mean(), "a larger σ should thin the fog (lighter picture)"

            # The SDF output (pre-coloured RdBu) is offered and rendered.
            browser.select_output("ray_min_sdf_rgb")
            sdf_view = browser.wait_new_picture(thinner, "3_ray_min_sdf_rgb", proc, min_fraction=0.5)

            # SDF slice: a textured plane appears in the scene and the process logs its range.
            # Drawn over the (near-white) rgb render: over the SDF view, whose colormap is the
            # slice's, the young model's all-positive slice is blue on blue and hard to see.
            browser.select_output("rgb")
            browser.wait_new_picture(sdf_view, "4_rgb_again", proc, min_fraction=0.5)
            browser.page.get_by_label("Composite depth", exact=True).uncheck()  # draw scene objects over the render
            before = browser.stable_shot("4_no_composite", proc)
            mark = len(proc.output())
            browser.page.get_by_label("Show SDF slice", exact=True).check()
            slice_log = proc.wait_log(
                r"viewer: SDF slice z=\+0\.00 drawn \(256x256 px, sdf in \[(-?[\d.]+), (-?[\d.]+)\]", after=mark
            )
            assert float(slice_log.group(2)) > 0  # a certified distance, positive away from any surface
            with_slice = browser.wait_new_picture(before, "5_slice", proc, min_fraction=0.02)
            red, _, blue = changed_colour(before, with_slice)
            assert blue > red + 20, (red, blue)  # drawn in RdBu's blue: sdf > 0 on most of the plane

            # Extract mesh: this young model may have no surface yet; either way the click runs
            # marching cubes in the trainer process and reports in the panel.
            mark = len(proc.output())
            browser.page.get_by_role("button", name="Extract mesh", exact=True).click()
            proc.wait_log(r"viewer: (mesh: \d+ vertices|mesh extraction found no zero crossing)", after=mark)
            wait_until(lambda: browser.status().startswith("mesh:"), STEP_S, "mesh status in the panel", proc)

            # Back to the schedule.
            mark = len(proc.output())
            browser.page.get_by_role("button", name="Reset σ, s to schedule", exact=True).click()
            proc.wait_log(r"viewer: σ and s follow the schedule again", after=mark)
            wait_until(lambda: "(schedule)" in browser.status(), STEP_S, "status back on the schedule", proc)
            browser.shot("6_reset")
            browser.close()
        assert proc.listening_addresses() == {"127.0.0.1"}  # still no wildcard (0.0.0.0 / ::) listener, long after start-up
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_ns_viewer_on_checkpoint_in_browser(trained_run: TrainedRun, shots: Path):
    """The same controls in `ns-viewer --load-config` on a trained checkpoint."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = ViewerProcess(
        [ns("ns-viewer"), "--load-config", trained_run.config, "--viewer.websocket-port", port,
         "--viewer.websocket-host", "127.0.0.1", "--viewer.max-num-display-images", "8"],
        shots / "ns-viewer.log", port,
    )  # fmt: skip
    try:
        proc.wait_listening()
        assert proc.listening_addresses() == {"127.0.0.1"}
        with sync_playwright() as pw:
            browser = Browser(pw, port, shots)
            wait_until(lambda: certsdf_controls_shown(browser), STEP_S, "certsdf's controls in the page", proc)
            browser.wait_frame(proc)
            check_offline(browser)
            rgb = browser.stable_shot("1_rgb", proc)
            check_canvas_rendered(rgb)
            # σ and s were set from the checkpoint's step (update_to_step), not a slider
            status = re.search(r"σ=[\d.]+ vox, s=[\d.]+ vox \(schedule\), step (\d+)", browser.status())
            assert status and int(status.group(1)) >= trained_run.steps - 100, browser.status()

            # The SDF view of a trained model: most rays clear the surface by more than the
            # certificate's range (saturated blue), those through the object go red.
            browser.select_output("ray_min_sdf_rgb")
            sdf_view = browser.wait_new_picture(rgb, "2_ray_min_sdf_rgb", proc, min_fraction=0.5)
            mean = sdf_view[CANVAS].reshape(-1, 3).mean(axis=0)
            assert mean[2] > mean[0] + 30, mean

            browser.page.get_by_label("Composite depth", exact=True).uncheck()
            before = browser.stable_shot("3_no_composite", proc)
            mark = len(proc.output())
            browser.page.get_by_role("button", name="Extract mesh", exact=True).click()
            m = proc.wait_log(r"viewer: mesh: (\d+) vertices, (\d+) faces", after=mark)
            assert int(m.group(1)) > 100 and int(m.group(2)) > 100  # a trained model has a surface
            wait_until(lambda: f"mesh: {m.group(1)} vertices" in browser.status(), STEP_S, "mesh status", proc)
            with_mesh = browser.wait_new_picture(before, "4_mesh", proc, min_fraction=0.003)

            browser.page.get_by_label("Show mesh", exact=True).uncheck()
            browser.wait_new_picture(with_mesh, "5_mesh_hidden", proc, min_fraction=0.003)

            mark = len(proc.output())
            browser.page.get_by_label("Show SDF slice", exact=True).check()
            log = proc.wait_log(r"viewer: SDF slice z=\+0\.00 drawn .*sdf in \[(-?[\d.]+), [\d.]+\], ([\d.]+)% inside\)", after=mark)
            assert float(log.group(1)) < 0 < float(log.group(2))  # the mid-height plane cuts the object
            browser.shot("6_slice")
            browser.close()
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()
