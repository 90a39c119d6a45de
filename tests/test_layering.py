"""Imports go downward only: mllm_jax.kernels <- mllm_jax.parallel <- everything else in mllm_jax, and mllm_jax.data
never imports mllm_jax.train (docs/architecture.md, "Layers"). Every module is parsed (ast), so imports inside
functions count too."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mllm_jax"
# A layer may import mllm_jax only from these subpackages.
ALLOWED = {"kernels": ("kernels",), "parallel": ("kernels", "parallel")}
# A subpackage of the rest that must not import these (mllm_jax.data sits below mllm_jax.train).
FORBIDDEN = {"data": ("train",), "hf": ("train",)}
# The one sanctioned exception, by (module, imported name): `python -m mllm_jax.hf.export --workdir=W` opens a training
# run's workdir with the train layer's own reader, lazily inside its CLI function; the library functions
# (hf.export.export, save_pretrained, ...) import nothing from train.
EXEMPT = {("mllm_jax.hf.export", "mllm_jax.train.workdir"),
          # decode's sharded path lays the prompt batch out exactly as training lays out an eval batch (lazily),
          # and under context parallelism permutes it with training's own planner step (lazily)
          ("mllm_jax.decode", "mllm_jax.data.placement.put_batch"),
          ("mllm_jax.decode", "mllm_jax.data.context_batches.permute_for_context")}
# The model layer (mllm_jax's top-level modules) never imports the layers above it; gin_setup, the registry of every
# config class (train's and data's included), sits above all of them by design.
MODEL_FORBIDDEN = ("data", "hf", "train", "datasets", "processor")
ABOVE_ALL = ("gin_setup",)


def imported_modules(source: str, module: str) -> list:
    """(line, absolute module name) of every import in ``source``, the source of ``module`` (dotted, for relative
    imports); ``from a import b`` counts as a.b, since b may be a submodule."""
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return sorted(out)


def upward_imports(source: str, module: str) -> list:
    """'line: name' for each import of ``module`` (e.g. mllm_jax.parallel.mesh) that reaches above its layer."""
    parts = module.split(".")
    allowed = ALLOWED.get(parts[1]) if len(parts) > 1 else None
    forbidden = FORBIDDEN.get(parts[1], ()) if len(parts) > 1 else ()
    if len(parts) == 2:  # a top-level module: the model layer
        forbidden = MODEL_FORBIDDEN
    if allowed is None and not forbidden:
        return []
    bad = []
    for line, name in imported_modules(source, module):
        target = name.split(".")
        if target[0] != "mllm_jax" or (module, name) in EXEMPT:
            continue
        if allowed is not None and (len(target) < 2 or target[1] not in allowed):
            bad.append(f"{line}: {name}")
        elif len(target) > 1 and target[1] in forbidden:
            bad.append(f"{line}: {name}")
    return bad


def module_name(path: pathlib.Path) -> str:
    """Dotted name; a package's __init__ keeps its '.__init__' so relative imports resolve against the package."""
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)


def layered_files():
    top = [p for p in ROOT.glob("*.py") if p.name != "__init__.py" and p.stem not in ABOVE_ALL]
    return sorted([p for layer in (*ALLOWED, *FORBIDDEN) for p in (ROOT / layer).rglob("*.py")] + top)


@pytest.mark.parametrize("path", layered_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path):
    bad = upward_imports(path.read_text(), module_name(path))
    assert not bad, f"{path.relative_to(ROOT.parent)} imports above its layer: {bad}"


def test_the_check_sees_upward_imports():
    # Top-level, lazy (inside a function), relative and `from mllm_jax import x` forms are all caught.
    src = ("from mllm_jax.config import ModelConfig\n"
           "def f():\n    from mllm_jax import llm\n"
           "from ..loss import IGNORE\n"
           "import mllm_jax.layers\n"
           "from mllm_jax.kernels.meta import TokenMeta\n"
           "from mllm_jax.parallel import mesh\n"
           "from . import sibling\n")
    assert upward_imports(src, "mllm_jax.parallel.x") == [
        "1: mllm_jax.config.ModelConfig", "3: mllm_jax.llm", "4: mllm_jax.loss.IGNORE", "5: mllm_jax.layers"]
    assert upward_imports(src, "mllm_jax.kernels.x") == [
        "1: mllm_jax.config.ModelConfig", "3: mllm_jax.llm", "4: mllm_jax.loss.IGNORE", "5: mllm_jax.layers",
        "7: mllm_jax.parallel.mesh"]
    assert upward_imports(src, "mllm_jax.train.x") == []
    assert upward_imports("from mllm_jax.train import loop\nfrom mllm_jax import config\n", "mllm_jax.data.x") == [
        "1: mllm_jax.train.loop"]


def test_old_data_paths_still_import():
    # mllm_jax.datasets and mllm_jax.processor moved into mllm_jax.data; the old names are deprecated aliases.
    import importlib
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("mllm_jax.datasets.config")
        old_processor = importlib.import_module("mllm_jax.processor")
    assert old is importlib.import_module("mllm_jax.data.datasets.config")
    assert old_processor.MultimodalProcessor is importlib.import_module("mllm_jax.data.processor").MultimodalProcessor
    if caught:  # only the first import in a process warns
        assert all(issubclass(w.category, DeprecationWarning) for w in caught)


def test_the_model_layer_check_sees_imports_of_data_train_and_hf():
    src = ("from mllm_jax.train import loop\n"
           "def f():\n    from mllm_jax.data.placement import batch_specs\n"
           "import mllm_jax.hf.pretrained\n"
           "from mllm_jax import layers\n")
    assert upward_imports(src, "mllm_jax.llm") == [
        "1: mllm_jax.train.loop", "3: mllm_jax.data.placement.batch_specs", "4: mllm_jax.hf.pretrained"]
    # the listed exception, and only it, passes
    assert upward_imports("from mllm_jax.data.placement import put_batch\n", "mllm_jax.decode") == []
    assert upward_imports("from mllm_jax.data.placement import batch_specs\n", "mllm_jax.decode") != []
