"""Cost of the background model's candidates on CPU: one training step's forward + backward.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/studies/background_field_cost.py [--rays 4096 --samples 16]

Times, for `rays × samples` random points around the region, nerfstudio's NerfactoField (torch;
`background-model nerfacto`) and certsdf's dense feature volume on the contracted space
(`background-model grid`) at three resolutions. The median of three passes is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nerfstudio.cameras.rays import Frustums, RaySamples

from certsdf_ns.method.background import GridBackgroundField, NerfactoBackgroundField, RegionContraction


def samples_at(points: torch.Tensor) -> RaySamples:
    n = len(points)
    directions = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    frustums = Frustums(origins=points[:, None], directions=directions[:, None], starts=torch.zeros(n, 1, 1),
                        ends=torch.full((n, 1, 1), 1e-2), pixel_area=torch.ones(n, 1, 1))  # fmt: skip
    return RaySamples(frustums=frustums, camera_indices=torch.zeros(n, 1, 1, dtype=torch.long))


def step_seconds(field: torch.nn.Module, samples: RaySamples) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        density, rgb = field(samples)
        (density.mean() + rgb.square().mean()).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rays", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    samples = samples_at(torch.randn(args.rays * args.samples, 3) * 3.0)
    contraction = RegionContraction(torch.zeros(3), 1.0)
    print(f"{args.rays} rays x {args.samples} samples, {torch.get_num_threads()} thread(s):")
    print(f"  nerfacto field (torch, 16 levels): {step_seconds(NerfactoBackgroundField(contraction, 50, 'torch'), samples) * 1e3:.0f} ms")
    for resolution in (64, 96, 128):
        grid = GridBackgroundField(contraction, resolution, 8, 64)
        print(f"  dense grid {resolution}^3 x 9: {step_seconds(grid, samples) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
