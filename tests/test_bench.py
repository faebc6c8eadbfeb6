"""Smoke tests of `certsdf-bench`: every suite end to end at a tiny budget, plus its pure parts.

The suites run through the real console script on the session's tiny generated scene
(48 px), with tiny models and 6 s of training per run: certsdf and nerfacto (through the
LPIPS-stub launcher) in `speed`, certsdf in `quality` (grid meshes vs the ground truth) and in
`sigma` (an annealed σ schedule). Budgets are seconds of training, so the
whole file takes under 4 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
import re
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from conftest import ns, start_cli_runs

BUDGET_S = 6
TINY = [
    "--trial.rays-per-batch", "512", "--trial.n-test-views", "1", "--trial.mesh-points", "5000",
    "--trial.certsdf-mesh-resolution", "64",
    "--trial.steps-per-save.certsdf", "3", "--trial.steps-per-save.nerfacto", "1",
    "--trial.extra-args",
    "certsdf:--pipeline.model.grid-resolution 48 --pipeline.model.hash-log2-size 14 --pipeline.model.hash-max-res 128",
    "nerfacto:--pipeline.model.log2-hashmap-size 14 --pipeline.model.max-res 256 --pipeline.model.num-levels 8 "
    "--pipeline.model.num-proposal-samples-per-ray 64 32 --pipeline.model.num-nerf-samples-per-ray 32",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench_args(suite: str, results: Path, *args, budget_s: float = BUDGET_S, tiny=TINY) -> list:
    return [ns("certsdf-bench"), suite, "--results-dir", results, "--budget-s", budget_s, *args, *tiny]


# certsdf's own budget: a short warm-up, so that the plan is made inside a budget of a few steps even on a
# loaded machine (the default waits for the density map's 40-step warm-up and times 20 steps more).
OWN_BUDGET_S = 20.0
OWN_BUDGET_TINY = [a + " --budget-warmup-steps 4 --budget-timing-steps 2" if str(a).startswith("certsdf:") else a for a in TINY]


@pytest.fixture(scope="module")
def bench_runs(tiny_scene: Path, tmp_path_factory) -> Dict[str, Tuple[Future, Path]]:
    """The module's four `certsdf-bench` runs, started together and run two at a time: each spends most
    of its CPU importing nerfstudio in its trainings and evaluations, on one core. name -> (future of the
    finished process, the suite's results folder)."""
    methods = ["certsdf", "nerfacto"] + ([] if torch.cuda.is_available() else ["instant-ngp"])
    runs = {
        "speed": ("speed", ["--scene", tiny_scene, "--methods", *methods, "--trial.eval-points", "1"], {}),
        "quality": ("quality", ["--scene-names", tiny_scene, "--methods", "certsdf", "--trial.eval-points", "1"], {}),
        "own_budget": (
            "quality",
            ["--scene-names", tiny_scene, "--methods", "certsdf", "--trial.eval-points", "1",
             "--trial.own-budget", "certsdf", "--trial.no-evaluate-first"],
            {"budget_s": OWN_BUDGET_S, "tiny": OWN_BUDGET_TINY},
        ),
        "sigma": (
            "sigma",
            ["--scene", tiny_scene, "--sigmas", "--anneal", "4", "1", "--anneal-steps", "5",
             "--certify.surface-samples", "100000", "--certify.n-points", "5000"],
            {},
        ),
    }  # fmt: skip
    folders = {name: tmp_path_factory.mktemp(f"bench_{name}") for name in runs}
    futures = start_cli_runs(
        {name: (_bench_args(suite, folders[name], *args, **kw), {"timeout": 900}) for name, (suite, args, kw) in runs.items()}
    )
    return {name: (futures[name], folders[name] / suite) for name, (suite, _, _) in runs.items()}


def _bench(bench_runs: Dict[str, Tuple[Future, Path]], name: str) -> Path:
    """The results folder of one of the module's bench runs, once it ended well."""
    future, folder = bench_runs[name]
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_pngs(folder: Path, names) -> None:
    for name in names:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name  # a plot, not an empty canvas


def _assert_budgeted_run(record: dict) -> None:
    """Trained for the budget (clock of training time), was stopped at it, and was evaluated."""
    tr = record["training"]
    assert record["status"] == "ok", record["reason"]
    assert tr["stopped_by"] == "budget" and tr["returncode"] == 0
    assert BUDGET_S * 0.9 <= tr["train_time_s"] <= BUDGET_S + 30, tr["train_time_s"]
    assert tr["steps"] >= 2 and tr["rays_per_sec"] > 0 and tr["peak_rss_mb"] > 200
    times = [c["train_time_s"] for c in tr["checkpoints"]]
    assert times == sorted(times) and len(times) >= 2
    assert record["evaluations"], "no checkpoint evaluated"
    for e in record["evaluations"]:
        assert 5.0 < e["psnr"] < 60.0 and 0.0 < e["ssim"] <= 1.0 and e["n_views"] == 1
    # Evaluated checkpoints are deleted afterwards (keep_checkpoints is off).
    assert not list(Path(tr["config_path"]).parent.glob("nerfstudio_models/*.ckpt"))


# --------------------------------------------------------------------------- suites


@pytest.fixture(scope="module")
def speed_results(bench_runs) -> Path:
    return _bench(bench_runs, "speed")


def test_speed_suite_runs_certsdf_and_nerfacto(speed_results: Path, tiny_scene: Path) -> None:
    for method in ("certsdf", "nerfacto"):
        record = json.loads((speed_results / f"{method}_{tiny_scene.name}.json").read_text())
        _assert_budgeted_run(record)
        assert record["machine"]["logical_cores"] >= 1 and record["machine"]["ram_gb"] > 0
        assert record["budget_s"] == BUDGET_S
    rows = {r["method"]: r for r in _rows(speed_results / "summary.csv")}
    ratio = float(rows["nerfacto"]["certsdf_over_method_rays_per_sec"])
    assert math.isfinite(ratio) and ratio > 0
    _assert_pngs(speed_results, ["psnr_vs_time.png", "rays_per_sec.png", "peak_rss.png"])
    md = (speed_results / "summary.md").read_text()  # the README's table, written by the suite itself
    assert "| nerfacto | " in md and f"| {float(rows['nerfacto']['rays_per_sec']):.0f} | {ratio:.2f} |" in md


def test_peer_trains_through_the_lpips_stub_launcher(speed_results: Path, tiny_scene: Path) -> None:
    """nerfacto builds LPIPS in populate_modules (offline: an AlexNet download that fails); through
    the launcher it constructs, trains several steps, and its checkpoints reload for evaluation."""
    record = json.loads((speed_results / f"nerfacto_{tiny_scene.name}.json").read_text())
    assert record["lpips"].startswith("LPIPS disabled offline")
    log = Path(record["training"]["log_path"]).read_text(errors="replace")
    assert "LPIPS disabled offline" in log
    assert record["training"]["steps"] >= 2 and record["evaluations"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA machines instant-ngp runs instead")
def test_cuda_only_methods_are_reported_not_dropped(speed_results: Path, tiny_scene: Path) -> None:
    record = json.loads((speed_results / f"instant-ngp_{tiny_scene.name}.json").read_text())
    assert record["status"] == "skipped" and "needs CUDA" in record["reason"]
    rows = {r["method"]: r for r in _rows(speed_results / "summary.csv")}
    assert rows["instant-ngp"]["status"] == "skipped"


def test_quality_suite_tracks_images_and_meshes(bench_runs, tiny_scene: Path) -> None:
    out = _bench(bench_runs, "quality")
    record = json.loads((out / f"certsdf_{tiny_scene.name}.json").read_text())
    _assert_budgeted_run(record)
    meshes = record["meshes"]
    assert [m["step"] for m in meshes] == [e["step"] for e in record["evaluations"]]
    # Ten seconds on a busy machine may be too few steps for a zero crossing: then the mesh is
    # recorded as empty (the plot says "no data"); any extracted mesh must be scored.
    for m in meshes:
        assert m["method"] == "certsdf-grid" and m["status"] in ("ok", "empty"), m
        if m["status"] == "ok":
            assert 0.0 < m["chamfer_l1"] < 1.0 and 0.0 <= m["fscore"]["0.01"] <= 1.0 and m["n_faces"] > 0
    assert {r["kind"] for r in _rows(out / "summary.csv")} == {"image", "mesh"}
    name = tiny_scene.name
    _assert_pngs(out, [f"{name}_psnr.png", f"{name}_ssim.png", f"{name}_chamfer_l1.png", f"{name}_fscore.png"])
    md = (out / "summary.md").read_text()
    assert "| test PSNR |" in md and f"| {record['evaluations'][-1]['psnr']:.2f} |" in md


def test_certsdf_with_its_own_budget_plans_and_stops_itself(bench_runs, tiny_scene: Path) -> None:
    """`--trial.own-budget certsdf`: certsdf gets the budget as --max-train-minutes (as the plain command on
    CPU), plans its schedules, stops by itself and saves; with --trial.no-evaluate-first only that last
    checkpoint is evaluated, view by view."""
    budget_s = OWN_BUDGET_S
    out = _bench(bench_runs, "own_budget")
    record = json.loads((out / f"certsdf_{tiny_scene.name}.json").read_text())
    tr = record["training"]
    assert record["status"] == "ok" and record["own_budget"], record["reason"]
    assert tr["stopped_by"] == "own budget" and tr["returncode"] == 0
    assert "--max-train-minutes" in tr["command"] and tr["train_time_s"] <= budget_s + 10
    log = Path(tr["log_path"]).read_text(errors="replace")
    assert "budget plan:" in log, log[-2000:]
    # certsdf's own clock counts its first step, which the bench's time axis leaves out (one-off costs).
    # The rule stops when the next step would not fit at the mean of the steps after the first, a mean of
    # at most spent/(n − 1) after n steps, so it never stops before budget·(n − 1)/n, however loaded the
    # machine. 0.6 s: the log's minutes have two decimals.
    stop = re.search(r"time budget reached after step (\d+) \(([0-9.]+) min of training", log)
    assert stop is not None, log[-2000:]
    steps, stopped_s = int(stop.group(1)) + 1, float(stop.group(2)) * 60.0
    assert budget_s * (steps - 1) / steps - 0.6 <= stopped_s <= budget_s + 0.6, log[-2000:]
    (evaluation,) = record["evaluations"]
    assert evaluation["step"] == max(c["step"] for c in tr["checkpoints"])
    assert len(evaluation["psnr_per_view"]) == 1 and evaluation["psnr_per_view"][0] == pytest.approx(evaluation["psnr"])


def test_own_budget_is_certsdf_only() -> None:
    from certsdf_ns.bench.trial import TrialOptions

    with pytest.raises(ValueError, match="only certsdf"):
        TrialOptions(own_budget=("tensorf",))


def test_sigma_suite_annealed_row(bench_runs) -> None:
    """One annealed σ row (fixed rows are the same code with start = end; certsdf's default σ is
    fixed and runs in the other suites): σ replayed on load, certificate numbers, plots."""
    from certsdf_ns.certified import annealed

    out = _bench(bench_runs, "sigma")
    rows = {r["label"]: r for r in _rows(out / "summary.csv")}
    assert set(rows) == {"anneal4to1"} and rows["anneal4to1"]["annealed"] == "True"
    record = json.loads((out / f"{rows['anneal4to1']['run']}.json").read_text())
    assert record["status"] == "ok", record["reason"]
    assert [e["step"] for e in record["evaluations"]] == [record["training"]["kept_checkpoints"][-1]["step"]]
    cert = record["certificate"]
    # The evaluated checkpoint carries the σ of the schedule at its step (replayed on load).
    step = record["evaluations"][0]["step"]
    assert cert["sigma"] / cert["voxel"] == pytest.approx(annealed(4.0, 1.0, step, 5), rel=1e-4)
    assert cert["max_distance_bound"] == pytest.approx(cert["sigma"] * 4.264890793922825, rel=1e-4)  # σΦ⁻¹(1−1e-5)
    assert cert["max_abs_sdf"] <= cert["max_distance_bound"] * (1 + 1e-5)
    assert math.isfinite(float(rows["anneal4to1"]["psnr"]))
    _assert_pngs(out, ["psnr_vs_sigma.png", "chamfer_vs_sigma.png", "bound_fraction_vs_sigma.png", "max_distance_vs_sigma.png"])


# --------------------------------------------------------------------------- pure parts


def test_report_tables_carry_the_ratios(tmp_path: Path) -> None:
    """`certsdf-bench report` turns suite.json rows into the README's markdown, ratios included."""
    from certsdf_ns.bench.report import write_report

    machine = {"cpu_model": "x", "logical_cores": 2, "usable_cores": 1, "ram_gb": 23.5, "cuda": False}
    speed = [{"method": "certsdf", "status": "ok", "reason": "", "rays_per_sec": 3000.0, "peak_rss_mb": 1900.0,
              "time_to_psnr20_s": 100.0, "time_to_psnr20_interp_s": 90.0, "final_psnr": 22.0, "final_ssim": 0.88,
              "certsdf_over_method_rays_per_sec": 1.0},
             {"method": "nerfacto", "status": "ok", "reason": "", "rays_per_sec": 400.0, "peak_rss_mb": 2500.0,
              "time_to_psnr20_s": None, "time_to_psnr20_interp_s": None, "final_psnr": 18.0, "final_ssim": 0.8,
              "certsdf_over_method_rays_per_sec": 7.5},
             {"method": "neus", "status": "skipped", "reason": "needs CUDA (tinycudann)"}]
    mesh = lambda m, t, cd: {"kind": "mesh", "scene": "bunny", "method": m, "step": 1, "train_time_s": t,  # noqa: E731
                             "chamfer_l1": cd, "fscore_0.01": 0.3, "fscore_0.02": 0.6, "export_s": 2.0, "status": "ok", "reason": ""}
    quality = [mesh("certsdf-grid", 900.0, 0.02), mesh("nerfacto-tsdf", 900.0, 0.05), mesh("nerfacto-poisson", 900.0, 0.08)]
    for name, rows in (("speed", speed), ("quality", quality)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "suite.json").write_text(json.dumps({"machine": machine, "budget_s": 600.0, "rows": rows}))
    out = write_report(tmp_path)
    assert set(out) == {"speed", "quality"}
    assert "| nerfacto | 400 | 7.50 | 2500 | – | 18.00 | 0.800 |" in out["speed"]
    assert "| neus | not runnable here: needs CUDA (tinycudann) |" in out["speed"]
    assert "1 usable core(s) of 2, 23.5 GB RAM" in out["speed"]
    assert "bunny: certsdf Chamfer-L1 0.0200 at 900 s vs best peer export nerfacto-tsdf 0.0500 at 900 s: ratio 0.40" in out["quality"]
    assert (tmp_path / "quality" / "summary.md").read_text() == out["quality"]


def test_report_compares_runs_of_several_folders_on_their_common_views(tmp_path: Path) -> None:
    """`certsdf-bench report --compare A B`: one row per evaluation of every run, in budget order, and the
    PSNR over the first views that all runs rendered (here 2 of certsdf's 3)."""
    from certsdf_ns.bench.report import compare_markdown

    def run(folder: str, method: str, budget: float, own: bool, evals: list) -> None:
        (tmp_path / folder / "quality").mkdir(parents=True)
        record = {"method": method, "budget_s": budget, "own_budget": own,
                  "training": {"checkpoints": [{"step": e["step"], "iterations": e["step"]} for e in evals],
                               "rays_per_sec": 4000.0, "peak_rss_mb": 2048.0, "mean_load_1m": 2.0},
                  "evaluations": evals}  # fmt: skip
        (tmp_path / folder / "quality" / f"{method}_lego.json").write_text(json.dumps(record))

    run("peer", "tensorf", 1800.0, False, [{"step": 9, "train_time_s": 600.0, "psnr": 20.0, "ssim": 0.8, "n_views": 2,
                                             "render_s": 4.0, "psnr_per_view": [19.0, 21.0]}])  # fmt: skip
    run("ours", "certsdf", 600.0, True, [{"step": 12, "train_time_s": 599.0, "psnr": 25.0, "ssim": 0.9, "n_views": 3,
                                          "render_s": 3.0, "psnr_per_view": [24.0, 26.0, 25.0]}])  # fmt: skip
    lines = compare_markdown([tmp_path / "peer", tmp_path / "ours"]).splitlines()
    assert "PSNR, first 2 views" in lines[0]
    assert lines[2].startswith("| certsdf | 10 min (own) | 10.0 | 12 | 25.00 | 0.900 | 3 | 25.00 | 1.0 | 4000 | 2.00 |")
    assert lines[3].startswith("| tensorf | 30 min | 10.0 | 9 | 20.00 | 0.800 | 2 | 20.00 | 2.0 |")


def test_report_compares_real_runs_of_several_folders_on_their_shared_views(tmp_path: Path) -> None:
    """`certsdf-bench report --compare A B` on real-capture runs: one table per scene across the folders, and,
    when the runs rendered different held-out views, the PSNR over the views they share (here 0 and 8)."""
    from certsdf_ns.bench.report import compare_real_markdown

    def run(folder: str, method: str, views: dict) -> None:
        (tmp_path / folder / "real").mkdir(parents=True, exist_ok=True)
        evals = [{"step": 10, "iterations": 10, "train_time_s": 900.0, "psnr": sum(views.values()) / len(views),
                  "psnr_masked": float("nan"), "ssim": 0.8, "n_views": len(views), "render_s_per_view": 2.0,
                  "views": [{"view": k, "psnr": v} for k, v in views.items()]}]  # fmt: skip
        record = {"method": method, "scene": "dtu_nomasks", "status": "ok", "reason": "", "training": {"rays_per_sec": 100.0},
                  "evaluations": evals, "meshes": [], "definitions": {"psnr": "whole image"}}  # fmt: skip
        (tmp_path / folder / "real" / f"{method}_dtu_nomasks.json").write_text(json.dumps(record))

    assert compare_real_markdown([tmp_path / "nothing"]) is None
    run("ours", "certsdf", {"0": 20.0, "8": 22.0, "16": 30.0})
    run("peer", "nerfacto", {"0": 10.0, "8": 12.0})
    md = compare_real_markdown([tmp_path / "ours", tmp_path / "peer"])
    assert "#### dtu_nomasks" in md and "| PSNR, views 0, 8 |" in md
    assert "| certsdf | – | 10 | 900 | 100 | 24.00 | 0.800 | 21.00 |" in md
    assert "| nerfacto | – | 10 | 900 | 100 | 11.00 | 0.800 | 11.00 |" in md
    assert "| results |" not in md  # one run per method: no folder column
    # certsdf again after a change, at the same step: each row names its folder and keeps its own views' PSNR.
    run("after", "certsdf", {"0": 24.0, "8": 26.0, "16": 31.0})
    md = compare_real_markdown([tmp_path / "ours", tmp_path / "peer", tmp_path / "after"])
    assert "| certsdf | ours | – | 10 | 900 | 100 | 24.00 | 0.800 | 21.00 |" in md
    assert "| certsdf | after | – | 10 | 900 | 100 | 27.00 | 0.800 | 25.00 |" in md
    assert "| nerfacto | peer | – | 10 | 900 | 100 | 11.00 | 0.800 | 11.00 |" in md


def test_lpips_stub_and_numpy_checkpoint_allow_list(tmp_path: Path) -> None:
    from certsdf_ns.bench.offline import LpipsStub, prepare_offline_peers

    path = tmp_path / "ckpt.pt"
    torch.save({"lr": np.float64(0.01), "w": torch.ones(2)}, path)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(Exception, match="numpy"):
            torch.load(path)  # what eval_setup hits on a nerfacto checkpoint with torch >= 2.6
        prepare_offline_peers(announce=False)
        assert torch.load(path)["lr"] == pytest.approx(0.01)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    assert LearnedPerceptualImagePatchSimilarity is LpipsStub
    assert math.isnan(float(LearnedPerceptualImagePatchSimilarity(normalize=True)(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))))


def test_checkpoint_selection_keeps_latest_before_each_target() -> None:
    from certsdf_ns.bench.runner import Checkpoint, eval_targets, select_checkpoints

    targets = eval_targets(100.0, 3, min_fraction=0.25)
    assert targets == pytest.approx([25.0, 50.0, 100.0])
    ckpts = [Checkpoint(s, f"{s}", s, float(t), float(t)) for s, t in enumerate([5, 20, 30, 49, 51, 99, 105])]
    kept = [c.train_time_s for c in select_checkpoints(ckpts, targets)]
    assert kept == [5, 20, 49, 99, 105]  # first, ≤25, ≤50, ≤100, last
    assert [c.train_time_s for c in select_checkpoints(ckpts, targets, first=False)] == [20, 49, 99, 105]


def test_time_to_threshold_interpolates_in_log_time() -> None:
    from certsdf_ns.bench.suites import time_to_threshold

    evals = [{"train_time_s": 10.0, "psnr": 15.0}, {"train_time_s": 40.0, "psnr": 25.0}]
    first, interp = time_to_threshold(evals, 20.0)
    assert first == 40.0 and interp == pytest.approx(20.0)
    assert all(math.isnan(v) for v in time_to_threshold(evals, 30.0))


def test_certificate_check_accepts_a_certified_sdf_and_catches_an_inflated_one() -> None:
    from certsdf_ns.bench.certify import certificate_report
    from certsdf_ns.certified import CertifiedSDFGrid

    grid = CertifiedSDFGrid(40, sigma=2 * 2.0 / 39)
    pts = grid.grid_points()
    grid.set_occupancy((pts.norm(dim=-1) < 0.5).float())
    good = certificate_report(grid, n_points=4000, surface_samples=200_000)
    assert good.bound_fraction >= 0.99 and good.max_abs_sdf <= good.max_distance_bound * (1 + 1e-5)

    class Inflated:  # the same grid with its SDF tripled: no longer 1-Lipschitz
        def __getattr__(self, name):
            return getattr(grid, name)

        def sdf_grid(self):
            return 3.0 * grid.sdf_grid()

        def sdf(self, x, sdf_grid=None):
            return grid.sdf(x, sdf_grid)

    bad = certificate_report(Inflated(), n_points=4000, surface_samples=200_000)
    assert bad.bound_fraction < 0.8


def test_certsdf_grid_mesh_is_in_the_scene_frame_and_scored() -> None:
    """The grid export of a sphere of radius 0.5 lands on it (Chamfer well under a voxel)."""
    import trimesh

    from certsdf_ns.bench.meshes import MeshResult, certsdf_grid_mesh, score_mesh
    from certsdf_ns.certified import CertifiedSDFGrid

    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.geometry = CertifiedSDFGrid(40, aabb=((-0.6, -1.0, -1.0), (1.4, 1.0, 1.0)), sigma=2.0 / 39)

    field = Field()
    pts = field.geometry.grid_points()
    centre = torch.tensor([0.4, 0.0, 0.0])
    field.geometry.set_occupancy(((pts - centre).norm(dim=-1) < 0.5).float())
    mesh = certsdf_grid_mesh(field)
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    sphere.apply_translation(centre.numpy())
    scored = score_mesh(MeshResult("certsdf-grid", 0, 0.0), mesh, sphere, n_points=20_000)
    assert scored.status == "ok" and scored.chamfer_l1 < 0.02, scored  # voxel = 0.051
    from certsdf_ns.export.mesh import extract_mesh  # the same extractor on the node SDF itself

    fallback = score_mesh(MeshResult("certsdf-grid", 0, 0.0), extract_mesh(field.geometry, resolution=0), sphere, n_points=20_000)
    assert fallback.chamfer_l1 < 0.02, fallback
    shifted = sphere.copy()
    shifted.apply_translation([0.2, 0.0, 0.0])
    assert score_mesh(MeshResult("certsdf-grid", 0, 0.0), mesh, shifted, n_points=20_000).chamfer_l1 > 0.05
    empty = CertifiedSDFGrid(8)  # nothing occupied: no zero crossing
    assert score_mesh(MeshResult("certsdf-grid", 0, 0.0), certsdf_grid_mesh(type("F", (), {"geometry": empty})()),
                      sphere, n_points=100).status == "empty"  # fmt: skip


def test_every_method_command_line_parses_with_ns_train(tiny_scene: Path, tmp_path: Path) -> None:
    """The exact ns-train arguments of each method (CUDA-only ones included, which cannot run
    here) are accepted by ns-train's own tyro parser and land in the config."""
    import shutil

    import tyro

    from certsdf_ns.bench.methods import TrainSettings, all_methods, near_far
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    scene = Path(shutil.copytree(tiny_scene, tmp_path / "scene"))
    settings = TrainSettings(1024, camera_res_scale_factor=0.5, steps_per_save=7, scratch_dir=tmp_path / "scratch")
    near, far = near_far(scene)
    assert 0.05 <= near < 4.0 - 1.5 and far > 4.0 + 1.5  # cameras sit at radius 4 around the box
    for name, spec in all_methods().items():
        config = tyro.cli(AnnotatedBaseConfigUnion, args=[spec.ns_method, *spec.train_args(scene, settings)])
        dm = config.pipeline.datamanager
        assert config.method_name == spec.ns_method
        assert dm.train_num_rays_per_batch == 1024 and dm.camera_res_scale_factor == 0.5, name
        assert config.machine.device_type == "cpu" and config.mixed_precision is False, name
        data = Path(config.data or dm.dataparser.data).resolve()  # certsdf takes ns-train's top-level --data
        assert data in (scene.resolve(), (tmp_path / "scratch" / "scene_sdfstudio").resolve()), name
        if name == "nerfacto":
            assert config.pipeline.model.disable_scene_contraction and config.pipeline.model.far_plane == pytest.approx(far, abs=1e-3)
        if name.startswith("certsdf"):
            assert config.pipeline.model.colour_encoding == ("dense" if name == "certsdf-dense" else "hash"), name
    meta = json.loads((tmp_path / "scratch" / "scene_sdfstudio" / "meta_data.json").read_text())  # neus's copy
    assert len(meta["frames"]) == len(json.loads((scene / "transforms_train.json").read_text())["frames"])


def test_peer_export_command_selects_the_checkpoint() -> None:
    from certsdf_ns.bench.meshes import PeerExportOptions, peer_export_args
    from certsdf_ns.bench.peer_export import _split_load_step

    cmd = peer_export_args("poisson", Path("c.yml"), Path("out"), 40, PeerExportOptions(poisson_points=1000))
    i = cmd.index("certsdf_ns.bench.peer_export")
    step, rest = _split_load_step(cmd[i + 1 :])
    assert step == 40 and rest[0] == "poisson" and "--bench-load-step" not in rest
    assert rest[rest.index("--num-points") + 1] == "1000" and rest[rest.index("--normal-method") + 1] == "open3d"


@pytest.mark.parametrize("evaluation", ["ok", "failed", "raised"])
def test_checkpoints_outlive_a_failed_evaluation(evaluation: str, tmp_path: Path, monkeypatch) -> None:
    """The bench deletes a run's checkpoints once they are evaluated; a run whose evaluation failed keeps
    them (and its record names them), so it can be evaluated again instead of trained again."""
    from types import SimpleNamespace

    from certsdf_ns.bench import trial
    from certsdf_ns.bench.runner import Checkpoint, RunResult

    ckpt = tmp_path / "step-000000010.ckpt"
    ckpt.write_bytes(b"weights")
    run = RunResult(method="certsdf", scene="s", run_name="r")
    run.kept_checkpoints = [Checkpoint(step=10, path=str(ckpt), iterations=10, train_time_s=1.0, wall_time_s=1.0)]
    monkeypatch.setattr(trial, "run_budgeted", lambda *args, **kwargs: run)

    def evaluate(req, opts, run, out_dir, record, progress):
        if evaluation == "raised":
            raise RuntimeError("renderer crashed")
        if evaluation == "failed":
            record["status"], record["reason"] = "failed", "evaluation: config.yml not readable"

    req = SimpleNamespace(spec=SimpleNamespace(name="certsdf"), scene=SimpleNamespace(path=tmp_path), budget_s=1.0, run_name="r")
    opts = SimpleNamespace(grace_s=1.0, startup_timeout_s=1.0, evaluate_first=False, keep_checkpoints=False,
                           runs_own_budget=lambda name: False)  # fmt: skip
    record: dict = {}
    if evaluation == "raised":
        with pytest.raises(RuntimeError):
            trial.train_and_evaluate(req, opts, None, [1.0], tmp_path, record, evaluate)
    else:
        trial.train_and_evaluate(req, opts, None, [1.0], tmp_path, record, evaluate)
    assert ckpt.exists() == (evaluation != "ok")
    assert ("checkpoints_kept" in record) == (evaluation != "ok")
    if evaluation != "ok":
        assert record["checkpoints_kept"] == [str(ckpt)]
