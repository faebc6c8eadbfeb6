"""Silhouette IoU and mask coverage of a trained certsdf run's mesh on its held-out views.

    python scripts/studies/heldout_silhouettes.py outputs/EXP/certsdf/TS/config.yml [--resolution 256]

For a NeuS/IDR run (DTU): the certified grid's zero set (the bench's extraction) is ray-cast from
every held-out camera at the run's resolution and compared with the scene's object masks, read
even when the run trained without them (`use-masks False`). The same functions as
`certsdf-bench real` (`certsdf_ns.bench.meshes.silhouette_scores`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from certsdf_ns.bench.evaluate import heldout_views
from certsdf_ns.bench.meshes import certsdf_grid_mesh, silhouette_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    from nerfstudio.utils.eval_utils import eval_setup

    config, pipeline, _, _ = eval_setup(args.config, test_mode="inference")
    datamanager = config.pipeline.datamanager
    dataparser = dataclasses.replace(datamanager.dataparser, use_masks=True).setup()
    outputs = dataparser.get_dataparser_outputs("test")
    if outputs.mask_filenames is None:
        raise SystemExit(f"{datamanager.dataparser.data} has no object masks to compare with")
    labels = [Path(f).stem for f in outputs.image_filenames]
    views = heldout_views(outputs, datamanager.camera_res_scale_factor, labels, outputs.mask_filenames)
    mesh = certsdf_grid_mesh(pipeline.model.field, args.resolution)
    scores = silhouette_scores(mesh, views.cameras, views.masks, views.labels)
    for v in scores["per_view"]:
        print(f"view {v['view']}: IoU {v['iou']:.3f}, coverage {v['coverage']:.3f}")
    print(f"mean: silhouette IoU {scores['iou']:.3f}, mask coverage {scores['coverage']:.3f}")


if __name__ == "__main__":
    main()
