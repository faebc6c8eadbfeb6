"""The package's layout: imports run one way, and runs saved before the layout changed still load.

Layers, from the top: the assembly (``method_config``, ``pipeline``, ``demo``) → ``bench`` →
``viewer`` / ``export`` / ``training`` → ``method`` (model → field) → ``data`` → ``certified``,
``console``, ``errors``. A module may import from its own layer or below, never above; every
import counts, including those inside function bodies.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "certsdf_ns"

LAYER = {
    "certsdf_ns.certified": 0, "certsdf_ns.console": 0, "certsdf_ns.errors": 0, "certsdf_ns.output_paths": 0,
    "certsdf_ns.data": 1,
    "certsdf_ns.method": 2,
    "certsdf_ns.training": 3, "certsdf_ns.export": 3, "certsdf_ns.viewer": 3,
    "certsdf_ns.bench": 4,
    "certsdf_ns.pipeline": 5, "certsdf_ns.method_config": 6, "certsdf_ns.demo": 6,
}  # fmt: skip


def layer_of(module: str) -> int:
    for prefix, level in sorted(LAYER.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Set[str]:
    """Every certsdf_ns module named by an import statement anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("certsdf_ns"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / node.module.replace(".", "/") / a.name).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("certsdf_ns"))
    return found


def package_modules() -> Dict[str, Path]:
    return {
        module_name(p): p
        for p in PACKAGE.rglob("*.py")
        if "scripts" not in p.parts and module_name(p) != "certsdf_ns"
    }


def test_every_module_has_a_layer() -> None:
    for name in package_modules():
        layer_of(name)


def test_imports_never_run_up_the_layers() -> None:
    upward: List[str] = []
    for name, path in package_modules().items():
        for target in imports_of(path):
            if target == "certsdf_ns" or target not in package_modules() and target.rsplit(".", 1)[0] not in package_modules():
                continue
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} -> {target}")
    assert upward == [], "imports that run up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", ["certsdf_ns.method.model", "certsdf_ns.method.field"])
def test_model_and_field_know_nothing_of_the_viewer(module: str) -> None:
    path = package_modules()[module]
    assert not [m for m in imports_of(path) if m.startswith("certsdf_ns.viewer")]
    assert "viewer_controls" not in path.read_text()


def test_the_maths_is_nerfstudio_free() -> None:
    tree = ast.parse((PACKAGE / "certified.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [n for n in names if n.startswith(("nerfstudio", "certsdf_ns"))], names


def test_sigma_is_written_in_one_place() -> None:
    """Only the field sets the model's σ (scripts/ build grids of their own and are not the package)."""
    writers = [
        f"{path}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if ".sigma = " in line and path.name != "certified.py" and "scripts" not in path.parts
    ]
    assert len(writers) == 1 and "method/field.py" in writers[0], writers


@pytest.mark.parametrize(
    "old_path,new_class",
    [
        ("certsdf_ns.certsdf_model.CertSDFModelConfig", "certsdf_ns.method.model.CertSDFModelConfig"),
        ("certsdf_ns.dataparser.CertSDFDataParserConfig", "certsdf_ns.data.dataparser.CertSDFDataParserConfig"),
        ("certsdf_ns.trainer.CertSDFTrainerConfig", "certsdf_ns.training.trainer.CertSDFTrainerConfig"),
        ("certsdf_ns.optim.FusedAdamOptimizerConfig", "certsdf_ns.training.optim.FusedAdamOptimizerConfig"),
    ],
)
def test_a_config_saved_before_the_split_still_loads(old_path: str, new_class: str) -> None:
    """ns-train pickles classes by module path into config.yml; the old paths resolve to the new classes."""
    loaded = yaml.load(f"!!python/object:{old_path} {{}}\n", Loader=yaml.Loader)
    assert f"{type(loaded).__module__}.{type(loaded).__name__}" == new_class
