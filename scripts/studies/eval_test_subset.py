"""ns-eval of a Blender-format run on every N-th test view (full-resolution lego: 200 views take hours).

    python scripts/studies/eval_test_subset.py outputs/EXP/certsdf/TS/config.yml --every 20 --output-path m10_test10.json

Writes, next to the run's config.yml, a copy of the scene folder (`test_every<N>/`: the split files,
with transforms_test.json keeping frames[::N], and the image folders symlinked) and `config_test<K>.yml`,
the run's config with its data pointing at that copy; then runs `ns-eval` on it. For lego, N = 20
keeps r_0, r_20, …, r_180 (10 views).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml


def subset_scene(scene: Path, out: Path, every: int) -> int:
    """The scene at `out` with every `every`-th test frame; returns the number of test views kept."""
    out.mkdir(parents=True, exist_ok=True)
    for item in scene.iterdir():
        target = out / item.name
        if item.name == "transforms_test.json" or target.exists() or target.is_symlink():
            continue
        target.symlink_to(item.resolve())
    meta = json.loads((scene / "transforms_test.json").read_text())
    meta["frames"] = meta["frames"][::every]
    (out / "transforms_test.json").write_text(json.dumps(meta, indent=2))
    return len(meta["frames"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--output-path", type=Path, required=True)
    args = parser.parse_args()
    config = yaml.load(args.config.read_text(), Loader=yaml.Loader)  # nerfstudio's own way to read it
    datamanager = config.pipeline.datamanager
    scene = Path(datamanager.data or datamanager.dataparser.data)
    if not scene.is_absolute():
        scene = (Path.cwd() / scene).resolve()
    copy = (args.config.parent / f"test_every{args.every}").resolve()
    n = subset_scene(scene, copy, args.every)
    datamanager.data = datamanager.dataparser.data = copy
    subset_config = args.config.parent / f"config_test{n}.yml"
    subset_config.write_text(yaml.dump(config))  # as nerfstudio's trainer writes config.yml
    ns_eval = Path(sys.executable).parent / "ns-eval"
    sys.exit(subprocess.call([str(ns_eval), "--load-config", str(subset_config), "--output-path", str(args.output_path)]))


if __name__ == "__main__":
    main()
