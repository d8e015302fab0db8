"""Run the vlcache CLI as ``python -m vlcache`` would, and report on stderr whether torch was imported.

The last stderr line is ``torch imported: True|False``: the CLI's cheap checks (dataset JSON, paths,
device) must fail before the slow torch import. Test-only: ``VLCACHE_PROBE_BLOCK_SLEEP=S`` makes each written
block take S seconds longer, so a test can signal an extraction that is surely still running.
"""

import atexit
import os
import sys
import time

from vlcache.cli import main

_block_sleep = float(os.environ.get("VLCACHE_PROBE_BLOCK_SLEEP", "0"))
if _block_sleep:  # test-only: keep an extraction running long enough to be signalled mid-way
    from vlcache.storage.writer import StoreWriter

    _write_block = StoreWriter.write_block

    def _slow_write_block(self, block, arrays):
        _write_block(self, block, arrays)
        time.sleep(_block_sleep)

    StoreWriter.write_block = _slow_write_block

atexit.register(lambda: print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr, flush=True))
sys.argv[0] = "vlcache"
main()
