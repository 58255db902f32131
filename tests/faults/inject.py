"""Run a script in this process with a fault injected, for the fault-injection tests.

    python -m tests.faults.inject [--enospc NAME[:N]] [--hub ROOT [--slow-upload S]] SCRIPT [ARGS...]

--enospc NAME[:N]  the N-th (default 1st) atomic write of a file called NAME (a glob), in this process
                   or in any worker it starts, fails with ENOSPC after leaving a partly written
                   temporary, as on a full disk.
--hub ROOT         the Hub client is the recording stand-in (tests/hub_standin.py) keeping repos
                   under ROOT; --slow-upload S waits S seconds after each uploaded file and touches
                   ROOT/uploading, so a test can kill the process part-way through a push.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install_enospc(spec: str) -> None:
    """Audit hook: the N-th open for writing of '.tmp-*-NAME' leaves a partly written file and fails
    with ENOSPC, as a write on a full disk does."""
    name, _, nth = spec.partition(":")
    state = {"left": int(nth or 1), "busy": False}

    def hook(event, args):
        if event != "open" or state["busy"] or not args or not isinstance(args[0], (str, os.PathLike)):
            return
        path = Path(os.fsdecode(args[0]))
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        if not (path.name.startswith(".tmp-") and "w" in mode
                and fnmatch.fnmatchcase(path.name.split("-", 2)[-1], name)):
            return
        state["left"] -= 1
        if state["left"] == 0:
            state["busy"] = True
            path.write_bytes(b"PAR1 partial")  # what a full disk leaves: the start of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    sys.addaudithook(hook)


def install_hub(root: str, slow: float) -> None:
    from common.prep import hub
    from tests import hub_standin

    api = hub_standin.RecordingHfApi(root, failures_left=0)
    hub.make_hub_api = lambda token: api
    if slow:
        marker = Path(root) / "uploading"

        def copyfile(src, dst, *args, **kwargs):
            result = shutil.copyfile(src, dst, *args, **kwargs)
            marker.touch()
            time.sleep(slow)
            return result

        hub_standin.shutil = argparse.Namespace(copyfile=copyfile)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--enospc")
    parser.add_argument("--hub")
    parser.add_argument("--slow-upload", type=float, default=0.0)
    parser.add_argument("script")
    split = next(i for i, arg in enumerate(sys.argv) if i and arg.endswith(".py"))
    known = parser.parse_args(sys.argv[1 : split + 1])
    rest = sys.argv[split + 1 :]
    sys.path.insert(0, str(ROOT))
    if known.enospc:
        install_enospc(known.enospc)
        # Worker processes start fresh interpreters: they install the same hook from sitecustomize.
        site = str(Path(__file__).resolve().parent / "site")
        os.environ.update(VA_INJECT_ENOSPC=known.enospc, VA_INJECT_ROOT=str(ROOT),
                          PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    if known.hub:
        install_hub(known.hub, known.slow_upload)
    sys.argv = [known.script, *rest]
    runpy.run_path(known.script, run_name="__main__")


if __name__ == "__main__":
    main()
