"""Where a result comes from: the command, the commit, the machine, the versions, the date.

The apps and benchmarks write it as `provenance.json` beside every `results.json`; the
results page (`python scripts/render_results.py`) prints it under every table.
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

import keras
import tensorflow as tf

import keras_fip


def _command():
    """The command line of this process, as a user would type it (`python -m apps.x ...`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join([program] + [shlex.quote(argument) for argument in sys.argv[1:]])


def _git(*arguments):
    try:
        completed = subprocess.run(
            ["git", *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def provenance():
    """Where results come from: the command, the commit (and whether the tree differed from
    it), the machine, the library versions and the date.

    Returns:
        A JSON-ready dict.
    """
    status = _git("status", "--porcelain", "--untracked-files=no")
    devices = [device.device_type for device in tf.config.list_physical_devices()]
    return {
        "command": _command(),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "devices": {kind: devices.count(kind) for kind in sorted(set(devices))},
        },
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "keras_fip": keras_fip.__version__,
        },
    }


def write_results(output_dir, results, filename="results.json", page=None):
    """Writes `results` as JSON to `output_dir/filename` and `provenance.json` beside it.

    Args:
        output_dir: The directory (created if needed).
        results: A JSON-ready dict.
        filename: The results file's name. Defaults to `"results.json"`.
        page: The results page's summary of them (`scripts/render_results.py`), written
            as `summary.json` beside them. Defaults to `None` (none).

    Returns:
        The path of the results file.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=float)
    with open(os.path.join(output_dir, "provenance.json"), "w") as f:
        json.dump(provenance(), f, indent=2, sort_keys=True)
    if page is not None:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(page, f, indent=2)
            f.write("\n")
    return path
