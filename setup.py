"""Build hooks beyond pyproject.toml: install ``certsdf_ns_startup.pth`` beside the package, in wheels
and in editable installs alike (see certsdf_ns/startup.py for what its line does)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "certsdf_ns_startup.pth"
# One line, run by Python's `site` at every start-up in the environment: cheap unless `ns-*` runs.
PTH_LINE = (
    "import sys; sys.argv and __import__('os').path.basename(sys.argv[0]).startswith('ns-')"
    " and __import__('certsdf_ns.startup').startup.quiet_nerfstudio_imports(sys.argv)\n"
)


class BuildPyWithPth(build_py):
    """A wheel's build: the package, plus the .pth at the top of its purelib."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        extra = [] if self.editable_mode else [os.path.join(self.build_lib, PTH_NAME)]
        return list(super().get_outputs(include_bytecode)) + extra


class EditableWheelWithPth(editable_wheel):
    """`pip install -e`: setuptools' editable wheel, plus the same .pth."""

    def _select_strategy(self, *args, **kwargs):  # noqa: ANN002, ANN003 (setuptools' signature)
        return _AddPth(super()._select_strategy(*args, **kwargs))


class _AddPth:
    """Wraps setuptools' editable strategy: writes what it writes, then the .pth."""

    def __init__(self, strategy) -> None:  # noqa: ANN001
        self.strategy = strategy

    def __enter__(self) -> "_AddPth":
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc) -> object:  # noqa: ANN002
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
