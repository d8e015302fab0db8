"""`vlcache extract` in a subprocess, with test-only kill hooks, for the kill/resume and multi-rank tests.

    python extract_worker.py extract --dataset D --out URL [any `vlcache extract` option]

The arguments go to the real CLI unchanged. Hooks (environment variables; the library has none) patch
the writer and the models from outside, so the process dies at a chosen point with SIGKILL, which
nothing in the process can catch or clean up after:

    VLCACHE_TEST_KILL_AFTER_BLOCKS=k  SIGKILL itself right after its k-th block is written (done flags too)
    VLCACHE_TEST_KILL_BEFORE_DONE=b   SIGKILL itself in block b after its arrays, before its done flags
    VLCACHE_TEST_KILL_AT_BATCH=n      SIGKILL itself when the n-th forward batch starts (1-based), while
                                      the writer thread may still hold finished blocks
    VLCACHE_TEST_THREADS=n            torch intra-op threads (default 2), so numerics match the test process
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _env_int(name: str) -> int:
    return int(os.environ.get(name, -1))


def install_hooks() -> None:
    from vlcache.stages.extract.models import ExtractionModels
    from vlcache.storage.schema import DONE
    from vlcache.storage.writer import StoreWriter

    after_blocks = _env_int("VLCACHE_TEST_KILL_AFTER_BLOCKS")
    before_done = _env_int("VLCACHE_TEST_KILL_BEFORE_DONE")
    at_batch = _env_int("VLCACHE_TEST_KILL_AT_BATCH")
    written = [0]
    batches = [0]

    write_block = StoreWriter.write_block

    def hooked_write_block(self, block, arrays):
        if block == before_done:
            backend_write = self.backend.write_rows

            def write_rows(path, start, data):
                if path == DONE and int(np.asarray(data).max(initial=0)) == 1:
                    _die()
                backend_write(path, start, data)

            self.backend.write_rows = write_rows
        write_block(self, block, arrays)
        written[0] += 1
        if written[0] == after_blocks:
            _die()

    run = ExtractionModels.run

    def hooked_run(self, images, records):
        batches[0] += 1
        if batches[0] == at_batch:
            _die()
        return run(self, images, records)

    StoreWriter.write_block = hooked_write_block
    ExtractionModels.run = hooked_run


def main() -> None:
    torch.set_num_threads(int(os.environ.get("VLCACHE_TEST_THREADS", 2)))
    install_hooks()
    from vlcache.cli import app

    app(args=sys.argv[1:], prog_name="vlcache")


if __name__ == "__main__":
    main()
