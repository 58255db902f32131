"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder: ``inject.py``
puts it there so that worker processes (precompute writes shards in its workers) get the same
injected fault as the process that started them."""

import os
import sys

if os.environ.get("VA_INJECT_ENOSPC"):
    sys.path.insert(0, os.environ["VA_INJECT_ROOT"])
    from tests.faults.inject import install_enospc

    install_enospc(os.environ["VA_INJECT_ENOSPC"])
