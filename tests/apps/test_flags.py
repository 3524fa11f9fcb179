"""Every app imports in one process: absl flags are global, so two apps that define the
same flag collide (a `DuplicateFlagError` at import). Flags shared by several apps live in
`apps.common`."""

import importlib
import pkgutil

import apps


def test_every_app_imports_beside_every_other():
    names = sorted(module.name for module in pkgutil.iter_modules(apps.__path__))
    assert "continual" in names and "robustness" in names
    for name in names:
        importlib.import_module(f"apps.{name}")
