"""`certsdf-bench {speed,quality,sigma,real,report} [options]`: run a benchmark suite (tyro CLI, like ns-train).

Examples (full budgets; see README "Benchmarks"):

    certsdf-bench speed --budget-s 300
    certsdf-bench quality --budget-s 600
    certsdf-bench sigma --budget-s 300
    certsdf-bench real --scene-names dtu_masks dtu_nomasks fruit cup --methods certsdf nerfacto \\
      --budget-s 900 --trial.eval-points 3 --results-dir bench_results/real   # real captures
    certsdf-bench report --results-dir bench_results   # markdown tables of finished suites

Every option is listed by `certsdf-bench <suite> --help`.
"""

from __future__ import annotations

import sys
from typing import Union

import tyro
from typing_extensions import Annotated

from certsdf_ns.bench.real import RealConfig, run_real
from certsdf_ns.bench.report import ReportConfig, run_report
from certsdf_ns.bench.suites import QualityConfig, SigmaConfig, SpeedConfig, run_quality, run_sigma, run_speed
from certsdf_ns.console import silence_known_noise
from certsdf_ns.output_paths import OutputLocationError, check_writable_dir

Commands = Union[
    Annotated[SpeedConfig, tyro.conf.subcommand(name="speed")],
    Annotated[QualityConfig, tyro.conf.subcommand(name="quality")],
    Annotated[SigmaConfig, tyro.conf.subcommand(name="sigma")],
    Annotated[RealConfig, tyro.conf.subcommand(name="real")],
    Annotated[ReportConfig, tyro.conf.subcommand(name="report")],
]


def run(cfg) -> list:
    try:
        check_writable_dir(cfg.results_dir, "--results-dir")  # before hours of trials
        return _dispatch(cfg)
    except OutputLocationError as exc:  # also: earlier trials in --results-dir (suites.refuse_earlier_trials)
        print(f"certsdf-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _dispatch(cfg) -> list:
    if isinstance(cfg, SpeedConfig):
        return run_speed(cfg)
    if isinstance(cfg, QualityConfig):
        return run_quality(cfg)
    if isinstance(cfg, RealConfig):
        return run_real(cfg)
    if isinstance(cfg, ReportConfig):
        return run_report(cfg)
    return run_sigma(cfg)


def main() -> None:
    silence_known_noise()  # before evaluation imports nerfstudio's methods
    tyro.extras.set_accent_color("bright_yellow")
    run(tyro.cli(Commands, description=__doc__))


if __name__ == "__main__":
    main()
