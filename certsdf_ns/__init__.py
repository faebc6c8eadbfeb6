"""certsdf-ns: a nerfstudio method whose geometry is a certified signed distance function.

The package's parts (imports run downwards only):

- ``method_config.py``, ``pipeline.py``: what ``ns-train certsdf`` assembles;
- ``training/``: the trainer (safe checkpoints, exact resume), optimisers, config checks;
- ``viewer/``, ``export/``, ``bench/``: hang on the model, never the reverse;
- ``method/``: the model (rays → pixels) and the field (what is at a point);
- ``data/``: format detection, input validation, generated scenes;
- ``certified.py``: the maths, nerfstudio-free.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Dict, Optional

# ns-train pickles the classes of a run into its config.yml by module path. These modules moved
# when the package was split into folders; a config.yml written before still names the old paths,
# and the run must stay loadable (ns-eval, ns-export, ns-viewer, --load-dir). Only modules whose
# classes appear in a saved config are listed.
_MOVED: Dict[str, str] = {
    "certsdf_ns.certsdf_model": "certsdf_ns.method.model",
    "certsdf_ns.certsdf_field": "certsdf_ns.method.field",
    "certsdf_ns.dataparser": "certsdf_ns.data.dataparser",
    "certsdf_ns.trainer": "certsdf_ns.training.trainer",
    "certsdf_ns.optim": "certsdf_ns.training.optim",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a moved module's old path return the module at its new path (same object)."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        if fullname not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:  # noqa: ANN001
        module = importlib.import_module(_MOVED[spec.name])
        self._real_spec: Optional[object] = module.__spec__  # importlib overwrites it; put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_spec  # type: ignore[assignment]
        if module.__name__ == "certsdf_ns.method.model":
            # A config.yml from before the split also names nerfstudio's own VanillaPipeline, which
            # does not install the CPU marching cubes that certsdf's pipeline installs for
            # ns-export; loading the model's old path did, so keep doing it for those runs.
            from certsdf_ns.export import ns_export_compat

            ns_export_compat.patch_loaded_exporter()


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
