"""The package as users install it: a wheel, not the checkout, in an environment of its own.

The wheel is built from a copy of the sources and installed (`--no-deps`, not editable) into a fresh
venv layered over this project's environment (its site-packages on the path, as a user's nerfstudio
environment would provide nerfstudio and torch). From a folder outside the checkout, that install
reads every preset format and trains through `ns-train certsdf`. A second venv holds another torch
(a CUDA build's metadata) and asks pip what installing the wheel would change: nothing but certsdf.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import pytest
from PIL import Image

from conftest import REPO, SHARED, ns, warning_lines
from test_real_data import CLI_ARGS, small_cup, small_dtu, small_fruit

LEGO = SHARED / "nerf_synthetic" / "lego"
PROJECT_SITE = Path(sysconfig.get_paths()["purelib"])
OTHER_TORCH = {"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124"}
"""What a user's CUDA environment typically holds (metadata only: pip's resolver reads no more)."""


def require_shared() -> None:
    if not (LEGO.is_dir() and (SHARED / "real").is_dir()):
        pytest.skip(f"{SHARED} is absent: the shared scenes are not mounted")


def small_lego(dst: Path, n: int = 6, size: int = 40) -> Path:
    """NeRF-synthetic lego with `n` views per split at size×size (camera_angle_x does not depend on size)."""
    for split in ("train", "val", "test"):
        meta = json.loads((LEGO / f"transforms_{split}.json").read_text())
        meta["frames"] = meta["frames"][:n]
        for frame in meta["frames"]:
            out = dst / f"{frame['file_path']}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(LEGO / f"{frame['file_path']}.png").resize((size, size), Image.Resampling.BILINEAR).save(out)
        (dst / f"transforms_{split}.json").write_text(json.dumps(meta))
    return dst


def clean_env() -> Dict[str, str]:
    """The environment without anything that would put the checkout on the path, and Python's default
    warning filters (a user's)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONWARNINGS")}


def make_venv(root: Path) -> Path:
    """A venv whose path also holds this project's site-packages (a plain path: its .pth files, the
    editable install of the checkout among them, are not run)."""
    subprocess.run([sys.executable, "-m", "venv", root], check=True, capture_output=True, env=clean_env())
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=clean_env(),
    ).stdout.strip()  # fmt: skip
    (Path(site) / "zz_project_env.pth").write_text(f"{PROJECT_SITE}\n")
    return python


def pip(python: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "pip", "--disable-pip-version-check", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=clean_env(), timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """certsdf's wheel, built from a copy of the sources (so the checkout gets no build/ folder)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("certsdf_ns", "data_configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = pip(Path(sys.executable), "wheel", src, "--no-deps", "--no-build-isolation", "-w", root / "dist", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (root / "dist").glob("certsdf_ns-*.whl")
    return built


def test_wheel_holds_the_presets_and_only_what_users_run(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(n for n in names if n.startswith("certsdf_ns/data_configs/") and n.endswith(".json"))
    assert presets == [f"certsdf_ns/data_configs/{f}.json" for f in ("blender", "colmap", "nerfstudio", "neus")]
    assert not [n for n in names if "/scripts/" in n or n.startswith(("tests/", "docs/"))], names
    # Every subpackage of the checkout is in the wheel (the package list in pyproject.toml is explicit).
    subpackages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "certsdf_ns").rglob("__init__.py")}
    assert {p for p in subpackages if f"{p}/__init__.py" not in names} == set()
    # The start-up hook sits at the top of site-packages, where Python's `site` runs .pth lines.
    assert "certsdf_ns_startup.pth" in names
    assert "certsdf_ns.startup" in zipfile.ZipFile(wheel).read("certsdf_ns_startup.pth").decode()


@pytest.mark.parametrize(
    "argv,quiet",
    [
        (["/env/bin/ns-train", "certsdf", "--data", "scene"], True),
        (["ns-train", "nerfacto", "--data", "scene"], False),
        (["ns-train", "--help"], False),
        (["ns-export", "tsdf", "--load-config", "outputs/lego/certsdf/2026-01-01_000000/config.yml"], True),
        (["ns-viewer", "--load_config=outputs/lego/certsdf/ts/config.yml"], True),
        (["ns-export", "tsdf", "--load-config", "outputs/lego/nerfacto/ts/config.yml"], False),
        (["ns-viewer"], False),
        (["python", "-c", "ns-train certsdf"], False),
        ([], False),
    ],
)
def test_start_up_hook_acts_only_for_ns_commands_on_certsdf(argv, quiet) -> None:
    from certsdf_ns.startup import works_on_certsdf

    assert works_on_certsdf(argv) is quiet


def test_wheel_keeps_a_users_torch(wheel: Path, tmp_path: Path) -> None:
    """pip, asked to install the wheel where another torch is installed, plans to install certsdf alone."""
    python = make_venv(tmp_path / "cuda-env")
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    for name, version in OTHER_TORCH.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
    shown = pip(python, "show", "torch", cwd=tmp_path)
    assert f"Version: {OTHER_TORCH['torch']}" in shown.stdout  # pip sees the user's torch first
    report = tmp_path / "report.json"
    proc = pip(python, "install", "--dry-run", "--no-index", "--report", report, wheel, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert planned == ["certsdf-ns"], planned


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """The interpreter of a fresh venv holding the wheel (not editable, no dependencies installed)."""
    python = make_venv(tmp_path_factory.mktemp("env") / "venv")
    proc = pip(python, "install", "--no-deps", "--no-index", wheel, cwd=wheel.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python


def test_installed_package_is_the_wheel_and_reads_its_presets(installed: Path, tmp_path: Path) -> None:
    code = (
        "import certsdf_ns, json; from certsdf_ns.data.dataparser import load_preset; "
        "print(json.dumps([certsdf_ns.__file__, [load_preset(f)['scene_box' if f == 'blender' else 'auto_scale_poses'] "
        "for f in ('blender', 'nerfstudio', 'colmap')]]))"
    )
    proc = subprocess.run([installed, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, values = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(installed.parent.parent) and not Path(where).is_relative_to(REPO), where
    assert values == [[[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]], True, True]


FORMATS = {"blender": small_lego, "nerfstudio": small_fruit, "neus": small_dtu, "colmap": small_cup}


@pytest.fixture(scope="module")
def installed_runs(installed: Path, tmp_path_factory):
    """`ns-train certsdf --data <scene>` run by the installed package, one scene per format, two at a time."""
    require_shared()
    root = tmp_path_factory.mktemp("installed-runs")
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for fmt, make in FORMATS.items():
        data = make(root / "data" / fmt)
        args = [installed, ns("ns-train"), "certsdf", "--data", data, "--output-dir", root / "out", "--experiment-name", fmt,
                "--timestamp", "run", "--max-num-iterations", 2, *CLI_ARGS]  # fmt: skip
        runs[fmt] = pool.submit(
            subprocess.run, [str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=root, env=clean_env()
        )
    pool.shutdown(wait=False)
    return root, runs


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_installed_package_trains_every_format(fmt: str, installed_runs) -> None:
    root, runs = installed_runs
    proc = runs[fmt].result()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{fmt} format" in " ".join(proc.stdout.split())
    run_dir = root / "out" / fmt / "certsdf" / "run"
    assert list((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    assert "preset_dir: null" in (run_dir / "config.yml").read_text()  # the package's own presets
    # Python's default warning filters: nerfstudio's import-time deprecation warnings are hidden by
    # the wheel's start-up hook, and nothing else warns.
    assert warning_lines(proc.stdout + "\n" + proc.stderr) == [], proc.stderr[-3000:]


def test_the_start_up_hook_leaves_other_programs_warnings_alone(installed: Path, tmp_path: Path) -> None:
    """Another program in the same environment importing the same nerfstudio module still sees torch's
    deprecation warning: the hook acts only for `ns-*` commands on certsdf."""
    proc = subprocess.run(
        [installed, "-c", "import nerfstudio.field_components.activations"],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning: `torch.cuda.amp.custom_fwd(args...)` is deprecated" in proc.stderr, proc.stderr[-3000:]
