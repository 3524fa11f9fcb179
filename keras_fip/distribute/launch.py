"""Worker processes of one command on this machine, each with its `TF_CONFIG`."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time


def free_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.bind(("127.0.0.1", 0))
            sockets.append(held)
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def tf_config(workers, index):
    """The `TF_CONFIG` JSON of worker `index` in a cluster of `workers` addresses."""
    return json.dumps(
        {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}
    )


def _kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_workers(command, num_workers=2, timeout=120.0, env=None, cwd=None, attempts=2):
    """Runs `command` in `num_workers` local worker processes, each with its `TF_CONFIG`.

    Each worker gets a free loopback port and the `TF_CONFIG` of a cluster of
    `num_workers` workers on 127.0.0.1, and runs in its own process group. The call
    returns when every worker has exited, when one fails (the others, which would wait
    forever in a collective, are then killed), or at `timeout` seconds (all are killed).
    The process groups are always killed on the way out, so no worker outlives the
    call. A port taken between choosing and binding shows up as a failed start and is
    retried with new ports up to `attempts` times.

    Args:
        command: The argv list every worker runs, e.g.
            `[sys.executable, "-m", "benchmarks.multi_worker", "--role=worker"]`.
        num_workers: Number of workers (>= 1). Defaults to `2`.
        timeout: Seconds before every worker is killed. Defaults to `120.0`.
        env: Extra environment variables for the workers. Defaults to `None`.
        cwd: Working directory of the workers. Defaults to `None` (this one).
        attempts: Launches tried when a worker fails to bind its port. Defaults to `2`.

    Returns:
        A list, per worker, of dicts `{"returncode", "stdout", "stderr", "timed_out"}`
        (`returncode` -9 for a killed worker).

    Examples:

        >>> import sys
        >>> results = launch_workers([sys.executable, "-c", "print('hi')"], num_workers=2)
        >>> [r["stdout"].strip() for r in results]
        ['hi', 'hi']
    """
    if (
        not isinstance(command, (list, tuple))
        or not command
        or not all(isinstance(part, str) for part in command)
    ):
        raise ValueError(
            f"`command` must be a non-empty list of strings. Received: command={command!r}"
        )
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(
            f"`num_workers` must be a positive integer. Received: num_workers={num_workers!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"`timeout` must be a positive number. Received: timeout={timeout!r}")
    for attempt in range(attempts):
        results = _launch_once(command, num_workers, timeout, env, cwd)
        bind_failed = any(
            "address already in use" in r["stderr"].lower()
            or "failed to add port" in r["stderr"].lower()
            for r in results
        )
        if not bind_failed or attempt == attempts - 1:
            return results
    return results


def _launch_once(command, num_workers, timeout, env, cwd):
    addresses = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
    processes, logs = [], []
    timed_out = False
    try:
        for index in range(num_workers):
            worker_env = dict(os.environ)
            worker_env.update(env or {})
            worker_env["TF_CONFIG"] = tf_config(addresses, index)
            stdout = tempfile.TemporaryFile(mode="w+")
            stderr = tempfile.TemporaryFile(mode="w+")
            logs.append((stdout, stderr))
            processes.append(
                subprocess.Popen(
                    list(command),
                    env=worker_env,
                    cwd=cwd,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,  # Its own process group, killed as one.
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                time.sleep(2.0)  # Let the others report the failure, then stop them.
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                _kill_group(process)
            else:
                _kill_group(process)  # Children it may have left behind.
        for process in processes:
            process.wait()
    results = []
    for process, (stdout, stderr) in zip(processes, logs):
        stdout.seek(0)
        stderr.seek(0)
        results.append(
            {
                "returncode": process.returncode,
                "stdout": stdout.read(),
                "stderr": stderr.read(),
                "timed_out": timed_out,
            }
        )
        stdout.close()
        stderr.close()
    return results


def main(argv=None):
    """`python -m keras_fip.distribute [--workers=2] [--timeout=3600] -- COMMAND...`: runs
    COMMAND in local workers (`launch_workers`), prints each worker's output and exits
    with the first non-zero return code."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit(
            "Usage: python -m keras_fip.distribute [--workers=2] "
            "[--timeout=3600] -- python -m apps.compress "
            "--strategy=multi_worker --workers=1 --methods=fip"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m keras_fip.distribute")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv[:split])
    results = launch_workers(argv[split + 1 :], num_workers=args.workers, timeout=args.timeout)
    for index, result in enumerate(results):
        print(
            f"# worker {index}: return code {result['returncode']}"
            f"{' (timed out)' if result['timed_out'] else ''}"
        )
        print(result["stdout"], end="")
        if result["returncode"]:
            print(result["stderr"][-4000:], end="", file=sys.stderr)
    codes = [r["returncode"] for r in results if r["returncode"]]
    raise SystemExit(codes[0] if codes else 0)
