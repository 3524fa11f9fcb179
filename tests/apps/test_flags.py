"""Every app imports in one process: absl flags are global, so two apps that define the
same flag collide (a `DuplicateFlagError` at import). Flags shared by several apps live in
`apps.common`."""

import importlib
import os
import pkgutil

import apps


def test_every_app_imports_beside_every_other():
    names = sorted(module.name for module in pkgutil.iter_modules(apps.__path__))
    assert "continual" in names and "robustness" in names
    for name in names:
        importlib.import_module(f"apps.{name}")


def test_start_rejects_a_tpu_address_without_the_tpu_strategy(tmp_path):
    import pytest
    from absl.testing import flagsaver

    from apps import common

    with flagsaver.flagsaver(
        strategy="default", tpu="grpc://10.0.0.1:8470", output_dir=str(tmp_path)
    ):
        with pytest.raises(ValueError, match="Received: tpu='grpc://10.0.0.1:8470'"):
            common.start("demo")


def test_run_writes_numeric_scalars_on_the_chief_only(tmp_path):
    import tensorflow as tf
    from absl.testing import flagsaver

    from apps import common
    from tests.apps.conftest import scalar_tags

    with flagsaver.flagsaver(output_dir=str(tmp_path / "demo")):
        run = common.start("demo")
    assert run.is_chief and run.output_dir == str(tmp_path / "demo")
    assert run.log_dir("walk") == str(tmp_path / "demo" / "logs" / "walk")
    run.scalars(
        {
            "accuracy": 0.5,
            "count": 3,
            "name": "x",
            "curve": [1, 2],
            "flag": True,
            "missing": float("nan"),
        },
        step=7,
        prefix="a",
    )
    run.close()
    assert scalar_tags(str(tmp_path / "demo" / "logs")) == {
        "demo/a/accuracy": {7: 0.5},
        "demo/a/count": {7: 3.0},
    }
    quiet = common.Run(
        "demo", tf.distribute.get_strategy(), str(tmp_path / "quiet"), tensorboard=False
    )
    quiet.scalars({"accuracy": 0.5})
    assert quiet.log_dir("walk") is None
    assert not os.path.exists(tmp_path / "quiet" / "logs")


def test_start_refuses_resume_where_the_app_cannot_resume(tmp_path):
    import pytest
    from absl.testing import flagsaver

    from apps import common

    with flagsaver.flagsaver(resume=True, output_dir=str(tmp_path / "demo")):
        with pytest.raises(ValueError, match="`--resume` is not supported by apps.demo"):
            common.start("demo")
        run = common.start("demo", resumable=True)
        run.close()
