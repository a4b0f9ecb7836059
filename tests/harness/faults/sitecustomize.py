"""Fault injection for whole ``omnidiff`` processes (and the workers they spawn).

A test puts this folder first on ``PYTHONPATH``; every Python process then runs this file at
start-up and, when asked through the environment, patches the platform before any work:

* ``OMNIDIFF_FAULT_STALL_SAVE=<step>``: the last rank hangs just before writing its shard of
  that step's checkpoint (the other shards are written), so a test can kill a run in the
  middle of a save, like a node lost mid-save.
"""

import os
import time

_STALL = os.environ.get("OMNIDIFF_FAULT_STALL_SAVE")

if _STALL:
    from omnidiff.platform import checkpoint as _checkpoint

    _write_shard = _checkpoint.write_shard

    def _stalling_write_shard(path, state):
        last = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
        if last and path.parent.name.endswith(f"step_{int(_STALL):08d}"):
            while True:  # wait to be killed
                time.sleep(1)
        return _write_shard(path, state)

    _checkpoint.write_shard = _stalling_write_shard
