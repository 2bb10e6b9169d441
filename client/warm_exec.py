"""A SuperExec for `flower-supernode --isolation process` whose ClientApp processes start warm.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process, which imports torch,
Opacus and Flower again before any work: 3.6 s a message on 2 cores, the largest part of
a deployed round's overhead. A `flwr-clientapp` process cannot live on: it runs the one
task its token names and exits (`flwr/supernode/runtime/run_clientapp.py`,
`run_clientapp`: one `pull_task_input`, then `flwr_exit`). What `--isolation process`
leaves open is who starts those processes: a SuperExec of one's own.

This one is Flower's own (`flwr/supercore/superexec/run_superexec.py`: the same task
polling, plugin and Runtime API) with two parts swapped:

- the executor: each ClientApp task runs Flower's `run_clientapp` in a child forked from
  this process, which has imported what `client.app` imports from outside medfuse
  already. medfuse's own modules are dropped before any fork, so each child imports them
  afresh from the app Flower installed from the run's FAB, as `flwr-clientapp` would;
  one task per process, as in Flower;
- how soon the child asks again for the message's arrays when its SuperNode has not
  pulled them from the SuperLink yet (`shared_model/contract/pulls.py`: Flower waits 1 s,
  a second of every deployed round).

    python -m client.warm_exec --runtime-api-address 127.0.0.1:PORT --parent-pid PID

`--parent-pid` is the SuperNode's: this process ends with it. The environment variable
FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's; default 1 s) sets how often it asks its
SuperNode for a task.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

from shared_model.contract import pulls

PROJECT_DIR = Path(__file__).resolve().parents[1]
# the module, not the function of the same name it defines
flower_superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
flower_clientapp = importlib.import_module("flwr.supernode.runtime.run_clientapp")
FLOWER_PULL_AND_INFLATE = flower_clientapp.pull_and_inflate_object_from_tree


def _module_dir(module: object) -> str:
    """Where a module's file is ('' for a built-in, a namespace package or an odd object
    that stands in sys.modules, such as torch's `_ClassNamespace`)."""
    path = getattr(module, "__file__", None)
    if isinstance(path, str):
        return path
    spec = getattr(module, "__spec__", None)
    locations = getattr(spec, "submodule_search_locations", None)
    try:
        return str(next(iter(locations))) + os.sep if locations else ""
    except (TypeError, StopIteration):
        return ""


def drop_own_modules(project_dir: Path = PROJECT_DIR) -> list[str]:
    """Forget every imported module whose file lies in `project_dir` (medfuse's own), so a
    forked child imports them from the FAB Flower installs; third-party ones stay loaded."""
    root = str(project_dir) + os.sep
    env = str(Path(sys.prefix).resolve()) + os.sep  # a venv may lie inside the project

    def is_own(name: str, module: object) -> bool:
        where = _module_dir(module)
        top = name.split(".")[0]
        return (name != "__main__" and where.startswith(root) and not where.startswith(env)
                and ((project_dir / top).is_dir() or (project_dir / f"{top}.py").is_file()))

    own = [name for name, mod in list(sys.modules.items()) if is_own(name, mod)]
    for name in own:
        del sys.modules[name]
    return own


def warm_up() -> None:
    """Import what the ClientApp imports (torch, Opacus, Flower, NumPy, ...), then drop
    medfuse's own modules again (`drop_own_modules`)."""
    # lazy: importing it is the point, once, before the fork (then its modules go again)
    import client.app  # noqa: F401

    drop_own_modules()


def _child(spec: ExecutionSpec) -> None:
    """In the forked child: Flower's `flwr-clientapp` body for this task, then exit with
    its code, without running the parent's exit handlers."""
    code = 1
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address, token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends every run this way
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that a ClientApp task runs in a child forked
    from this warm process; other task types start as Flower starts them."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _child(spec)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the children that ended (called by Flower's loop before every poll)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)


def _executor(executor_type: ExecutorType, executor_config: object = None,
              **_: object) -> ForkExecutor:
    """Stands in for Flower's `get_executor`: the fork executor, whatever was asked."""
    return ForkExecutor()


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.warm_exec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", required=True,
                   help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="the SuperNode's process id: this process ends with it")
    p.add_argument("--root-certificates", default=None,
                   help="CA of a Runtime API served over TLS (default: plain, loopback)")
    return p.parse_args(argv)


def swap_flower_parts() -> None:
    """The two parts of Flower's SuperExec this one swaps (module docstring), for this
    process and the children it forks."""
    setattr(flower_superexec, "get_executor", _executor)  # noqa: B010
    flower_clientapp.pull_and_inflate_object_from_tree = pulls.prompt(
        FLOWER_PULL_AND_INFLATE)


def main(argv: list[str] | None = None) -> None:
    """Warm up, then run Flower's SuperExec loop with the fork executor."""
    args = _args(argv)
    warm_up()
    swap_flower_parts()
    flower_superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
