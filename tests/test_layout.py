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
    "certsdf_ns.startup": 0,
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
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p) != "certsdf_ns"}


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


def test_the_start_up_hook_imports_only_the_standard_library() -> None:
    """certsdf_ns/startup.py runs at the start of `ns-*` processes (certsdf_ns_startup.pth): it must
    be cheap and work before nerfstudio or torch is imported."""
    tree = ast.parse((PACKAGE / "startup.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "builtins", "os", "re", "warnings", "typing"}, names


def test_sigma_is_written_in_one_place() -> None:
    """Only the field sets the model's σ."""
    writers = [
        f"{path}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if ".sigma = " in line and path.name != "certified.py"
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


# --------------------------------------------------------------------------- scripts and --help

STUDIES = PACKAGE.parent / "scripts" / "studies"


def test_the_package_ships_no_scripts() -> None:
    """One-off studies are maintainers' tools in scripts/studies/, not modules of the wheel."""
    assert sorted(PACKAGE.glob("scripts/*.py")) == []
    assert sorted(p.name for p in STUDIES.glob("*.py")), f"no studies in {STUDIES}"


def _runs_at_import(node: ast.stmt) -> bool:
    """Whether a module-level statement does work when the module is imported."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
        return False
    if isinstance(node, ast.Expr):  # docstrings only
        return not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))
    if isinstance(node, (ast.Assign, ast.AnnAssign)):  # constants: no calls
        return node.value is not None and any(isinstance(n, ast.Call) for n in ast.walk(node.value))
    if isinstance(node, ast.If):
        return ast.unparse(node.test) not in ("__name__ == '__main__'",)
    return True


@pytest.mark.parametrize("script", sorted(p.name for p in STUDIES.glob("*.py")))
def test_studies_do_nothing_at_import(script: str) -> None:
    """Each study has a main() that runs only under `if __name__ == "__main__":`."""
    tree = ast.parse((STUDIES / script).read_text())
    working = [f"line {n.lineno}: {ast.unparse(n).splitlines()[0]}" for n in tree.body if _runs_at_import(n)]
    assert working == [], f"{script} runs code at import:\n" + "\n".join(working)
    assert "main" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{script} has no main()"
    (guard,) = [n for n in tree.body if isinstance(n, ast.If)]
    assert "main()" in ast.unparse(guard), f"{script}: the __main__ guard does not call main()"


def _documented_fields(body: List[ast.stmt]):
    """(name, line, docstring or None) of each assignment in `body`; the docstring is the string after it."""
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        doc = None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = after.value.value
        yield name, node.lineno, doc


def config_classes():
    """(module path, class node) of every settings dataclass of the package (a name ending in Config or Options)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Options")):
                yield path, node


def test_config_fields_have_one_line_docs() -> None:
    """`--help` shows each option's docstring: one line (what it does and its unit); rationale goes to
    docs/options.md. So do the docstrings of module constants next to the configs."""
    problems = []
    classes = list(config_classes())
    assert len(classes) >= 20, [c.name for _, c in classes]  # the walk found the configs
    for path, cls in classes:
        where = f"{path.relative_to(PACKAGE.parent)}"
        for name, line, doc in _documented_fields(cls.body):
            if name.startswith("_"):
                continue  # _target: not an option
            if doc is None:
                problems.append(f"{where}:{line} {cls.name}.{name} has no docstring")
            elif "\n" in doc.strip():
                problems.append(f"{where}:{line} {cls.name}.{name}: {doc.strip().count(chr(10)) + 1} lines")
    for path in sorted({p for p, _ in classes}):
        for name, line, doc in _documented_fields(ast.parse(path.read_text()).body):
            if doc is not None and "\n" in doc.strip():
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} constant {name}: {doc.strip().count(chr(10)) + 1} lines")
    assert problems == [], "docstrings that are not one line:\n" + "\n".join(problems)


def test_help_states_the_real_capture_defaults() -> None:
    """The --help lines of fill_carve_start_step and fill_depth give the values their None resolves to."""
    tree = ast.parse((PACKAGE / "method" / "model.py").read_text())
    constants = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id.startswith("REAL_")}  # fmt: skip
    (config,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CertSDFModelConfig"]
    docs = {name: doc for name, _, doc in _documented_fields(config.body)}
    assert f"or {constants['REAL_FILL_ONLY_STEPS']} without" in docs["fill_carve_start_step"]
    assert f"{constants['REAL_FILL_DEPTH_RADII']} on real captures" in docs["fill_depth"]
