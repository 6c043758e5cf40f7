"""The package's structure: imports point from higher layers to lower ones only, the import paths the README and
DESIGN §2 name keep working, and the README's layout table names every part of the tree."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fvkernels"
# Lowest first; a module may import its own layer and those before it.
LAYERS = ["common", "ops", "pipeline", "nn", "training", "evaluation", "app"]
# The package's entry points and the modules kept for earlier import paths sit above every layer.
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP  # the package itself
    if parts[1] == "_C":
        return LAYERS.index("ops")  # the compiled kernels
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def imported_modules(path: Path):
    """The fvkernels modules a file imports (`from fvkernels.a import b` names fvkernels.a.b when b is a module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "fvkernels")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fvkernels":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*candidate.split("."))).is_dir() or alias.name == "_C"
                yield candidate if is_module else node.module


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imported_modules(path):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{importer} imports {imported}")
    assert not upward, "a lower layer imports a higher one: " + "; ".join(upward)


# (documented path, where the object lives now)
DOCUMENTED = [
    ("fvkernels.nn.FVVAE", "fvkernels.nn.FVVAE"),
    *[(f"fvkernels.train.{name}", f"fvkernels.training.{name}")
      for name in ("SetData", "train", "save_checkpoint", "load_checkpoint", "read_checkpoint")],
    *[(f"fvkernels.baselines.{name}", f"fvkernels.evaluation.encoders.{name}")
      for name in ("AverageEncoder", "ConcatEncoder", "GMMFisherEncoder", "VLADEncoder", "BilinearEncoder",
                   "FVVAEEncoder")],
    *[(f"fvkernels.evaluate.{name}", f"fvkernels.evaluation.{name}")
      for name in ("normalize", "LinearSVM", "accuracy", "top_k_accuracy", "mean_average_precision")],
    ("fvkernels.attention.descriptor_contributions", "fvkernels.evaluation.attention.descriptor_contributions"),
    ("fvkernels.extract.load_fisher_vectors", "fvkernels.app.extract.load_fisher_vectors"),
    ("fvkernels.models.efficientnet_lite0", "fvkernels.app.efficientnet.efficientnet_lite0"),
    ("fvkernels.models.layer_activations", "fvkernels.app.backbones.layer_activations"),
    ("fvkernels.video.read_split", "fvkernels.app.video.read_split"),
    *[(f"fvkernels.{name}", f"fvkernels.{home}.{name}") for name, home in (
        ("fv_accumulate", "ops.fv_accumulate"), ("FVVAEParams", "pipeline.params"), ("fv_vae_encode", "pipeline.encode"),
        ("load_official_weights", "pipeline.official"), ("to_official_layout", "pipeline.official"),
        ("available_backends", "ops.dispatch"))],
]


def resolve(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("documented,home", DOCUMENTED)
def test_documented_import_paths_reach_the_code(documented, home):
    assert resolve(documented) is resolve(home)


def test_readme_layout_table_names_every_part_of_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    parts = [path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"]
    parts += [path for path in (ROOT / "csrc").rglob("*") if path.is_file()]
    missing = []
    for path in parts:
        name = path.stem if path.suffix == ".py" else path.name
        if not re.search(rf"\b{re.escape(name)}\b", table):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README's layout table does not name {missing}"


def test_every_test_the_readme_names_exists():
    named = set(re.findall(r"(tests/\w+\.py)::(\w+)", (ROOT / "README.md").read_text()))
    assert named, "the README's Guarantees name no test"
    missing = [f"{file}::{test}" for file, test in sorted(named)
               if not re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.MULTILINE)]
    assert not missing, f"the README names tests that do not exist: {missing}"
