"""The package's layers only point down, and no module reaches into another's privates.

Every import in `keras_fip` (module-level and inside functions) is parsed. A module may
import from its own layer's package or from a lower layer, never from a higher one; a
layer's packages do not import each other; there is no import cycle between modules; no
module imports a private name (`_name`) of another module; and no module reads a private
attribute that only Keras defines (`model._flatten_layers`, `variable._trainable`...).
"""

import ast
import os
import pathlib

import keras

import keras_fip

ROOT = pathlib.Path(keras_fip.__file__).parent

# Lower numbers are lower layers; a module imports only from its own package or below.
LAYERS = {
    "keras_fip.version": 0,
    "keras_fip.data": 0,
    "keras_fip.core": 1,
    "keras_fip.models": 2,
    "keras_fip.geometry": 2,
    "keras_fip.engine": 3,
    "keras_fip.distribute": 2,
    "keras_fip.operations": 4,
    "keras_fip.metrics": 4,
    "keras_fip.export": 4,
    "keras_fip.baselines": 5,
    "keras_fip.robustness": 5,
    "keras_fip": 6,  # The flat public namespace (keras_fip/__init__.py) sits on top.
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _package(module):
    """The layer package a module belongs to (the longest key of `LAYERS` it starts with)."""
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return max(matches, key=len)


def _imports(path, module):
    """`[(imported module, [names], line)]` for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if not path.name == "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _targets(imported, names, modules):
    """The modules an import reaches: `from pkg import a, b` reaches the submodules `a`
    and `b` when they are modules, else `pkg` itself."""
    submodules = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules]
    if names and len(submodules) == len(names):
        return submodules
    return [imported] + submodules


def _internal(name):
    return name == "keras_fip" or name.startswith("keras_fip.")


def _resolve(name, modules):
    """The module an import names (`from keras_fip.engine import masks` names a module)."""
    return name if name in modules else None


def test_imports_only_point_down_and_packages_of_a_layer_stay_apart():
    modules = dict(_modules())
    violations = []
    for module, path in modules.items():
        own = _package(module)
        for imported, names, line in _imports(path, module):
            targets = _targets(imported, names, modules)
            for target in targets:
                if not _internal(target) or own == "keras_fip":
                    continue
                other = _package(target)
                if other == own:
                    continue
                if LAYERS[other] >= LAYERS[own]:
                    violations.append(
                        f"{path.relative_to(ROOT.parent)}:{line} {module} -> {target}"
                    )
    assert not violations, "Imports that do not point down:\n" + "\n".join(violations)


def test_no_import_cycles_between_modules():
    modules = dict(_modules())
    graph = {}
    for module, path in modules.items():
        edges = set()
        for imported, names, _ in _imports(path, module):
            for target in _targets(imported, names, modules):
                if target in modules and target != module and not module.startswith(target):
                    edges.add(target)
        graph[module] = edges
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "Import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    modules = dict(_modules())
    violations = []
    for module, path in modules.items():
        for imported, names, line in _imports(path, module):
            if not _internal(imported):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    violations.append(f"{path.relative_to(ROOT.parent)}:{line} {imported}.{name}")
            if any(part.startswith("_") for part in imported.split(".")):
                violations.append(f"{path.relative_to(ROOT.parent)}:{line} {imported}")
        # `masks_lib._mask_of(...)`: a private name read through another module's alias.
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _internal(alias.name) and alias.name in modules:
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and _internal(node.module):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != module
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                violations.append(
                    f"{path.relative_to(ROOT.parent)}:{node.lineno} "
                    f"{aliases[node.value.id]}.{node.attr}"
                )
    assert not violations, "Private names imported across modules:\n" + "\n".join(violations)


def _private_names_defined(root):
    """Private attribute and method names defined under `root` (`self._x =`, `def _x`)."""
    names = set()
    for path in pathlib.Path(root).rglob("*.py"):
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") and not node.name.startswith("__"):
                    names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    return names


def test_no_private_keras_attribute_is_used():
    keras_private = _private_names_defined(os.path.dirname(keras.__file__))
    own = _private_names_defined(ROOT)
    only_keras = keras_private - own
    violations = []
    for _, path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in only_keras:
                violations.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} .{node.attr}")
    assert not violations, "Private Keras attributes:\n" + "\n".join(violations)
