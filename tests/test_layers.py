"""minidet's layers: a module imports only from the layers below its own (or from its own package, in its layer).

The layers, lowest first (docs/design.md says why each module is where it is):

0. the NumPy/CuPy switch and helpers that need nothing else;
1. the autograd engine, the kernel loaders, the all-reduce, the optimizers, box and anchor geometry;
2. the differentiable ops, checkpoints, gradcheck, the CPU launch harness (it launches the loaders' kernels);
3. modules and layers; matching (it shares the labels' constants with the focal loss);
4. the networks;
5. data sets, evaluation, pictures, the anchor report, and the package's own namespace (``import minidet``);
6. training, the course's exercises;
7. the command line.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "minidet"

LAYERS = {
    "minidet.backend": 0, "minidet.progress": 0, "minidet.nn.init": 0, "minidet.data.transforms": 0,
    "minidet.autograd": 1, "minidet.cuda": 1, "minidet.distributed": 1,
    "minidet.optim": 1, "minidet.boxes": 1, "minidet.anchors": 1,
    "minidet.functional": 2, "minidet.functional.arithmetic": 2, "minidet.functional.activation": 2,
    "minidet.functional.conv": 2, "minidet.functional.loss": 2, "minidet.functional.norm": 2,
    "minidet.functional.reduction": 2, "minidet.functional.shape": 2, "minidet.checkpoint": 2,
    "minidet.testing": 2, "minidet.cpu_harness": 2,
    "minidet.nn": 3, "minidet.nn.module": 3, "minidet.nn.layers": 3, "minidet.matching": 3,
    "minidet.models": 4, "minidet.models.resnet": 4, "minidet.models.vgg": 4, "minidet.models.efficientnet": 4,
    "minidet.models.fpn": 4, "minidet.models.heads": 4, "minidet.models.retinanet": 4,
    "minidet.models.torchvision_weights": 4,
    "minidet": 5, "minidet.data": 5, "minidet.data.shapes": 5, "minidet.data.coco": 5, "minidet.data.converters": 5,
    "minidet.evaluate": 5, "minidet.plots": 5, "minidet.anchor_report": 5,
    "minidet.train": 6, "minidet.exercises": 6,
    "minidet.cli": 7,
}


def module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_modules(path):
    """The minidet modules ``path`` imports: ``from minidet import backend`` is minidet.backend, ``from minidet
    import tensor`` is the package itself. Relative imports are not read here: ``test_imports_are_absolute``
    keeps them out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "minidet":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "minidet")
    return found


def package_of(name):
    return name.rsplit(".", 1)[0] if name.count(".") > 1 else name


def test_imports_are_absolute():
    relative = [f"{name}:{node.lineno}" for name, path in MODULES.items()
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not relative, f"relative imports (write them as from minidet.x import y): {relative}"


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYERS), (f"not in LAYERS: {sorted(set(MODULES) - set(LAYERS))}; "
                                         f"no longer modules: {sorted(set(LAYERS) - set(MODULES))}")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_below_or_its_own_package(name):
    upward = []
    for imported in imported_modules(MODULES[name]) - {name}:
        same_package = imported.startswith(name + ".") or package_of(imported) == package_of(name)
        if LAYERS[imported] > LAYERS[name] or (LAYERS[imported] == LAYERS[name] and not same_package):
            upward.append(f"{imported} (layer {LAYERS[imported]})")
    assert not upward, f"{name} (layer {LAYERS[name]}) imports {sorted(upward)}"


def test_the_layer_check_sees_an_upward_import(monkeypatch):
    # It can fail: say the engine imported the networks.
    monkeypatch.setitem(LAYERS, "minidet.models", 0)
    monkeypatch.setitem(LAYERS, "minidet.models.retinanet", 0)
    with pytest.raises(AssertionError, match="imports"):
        test_a_module_imports_only_from_below_or_its_own_package("minidet.models.retinanet")
