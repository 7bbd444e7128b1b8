"""Worker for tests/test_checkpoint.py: trains like `bigbatch train`, but the process SIGKILLs itself in the middle of
saving checkpoint `--kill-at` (after DeepSpeed wrote its files into the staging directory, before the manifest and
the rename): what a node failure or a hard time limit does to a save."""

import os
import signal
import sys

from bigbatch.cli import main
from bigbatch.run import checkpoint

if __name__ == "__main__":
    kill_at = checkpoint.tag_for(int(sys.argv[1]))
    real = checkpoint.write_manifest

    def write_manifest(directory, world):
        if directory.name == f"{kill_at}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(directory, world)

    checkpoint.write_manifest = write_manifest
    sys.exit(main(sys.argv[2:]))
