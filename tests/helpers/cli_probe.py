"""Run the vlcache CLI as ``python -m vlcache`` would, and report on stderr whether torch was imported.

The last stderr line is ``torch imported: True|False``: the CLI's cheap checks (dataset JSON, paths,
device) must fail before the slow torch import. Test-only hooks on ``StoreWriter.write_block``:
``VLCACHE_PROBE_BLOCK_SLEEP=S`` makes each written block take S seconds longer, and
``VLCACHE_PROBE_BLOCKS_FILE=PATH`` gets the number of blocks written so far after each one, so a test can
signal an extraction that is surely still running, right after its first block.
"""

import atexit
import os
import sys
import time
from pathlib import Path

from vlcache.cli import main

_block_sleep = float(os.environ.get("VLCACHE_PROBE_BLOCK_SLEEP", "0"))
_blocks_file = os.environ.get("VLCACHE_PROBE_BLOCKS_FILE")
if _block_sleep or _blocks_file:  # test-only: let a test see (and outpace) the blocks being written
    from vlcache.storage.writer import StoreWriter

    _write_block = StoreWriter.write_block
    _written = [0]

    def _probed_write_block(self, block, arrays):
        _write_block(self, block, arrays)
        _written[0] += 1
        if _blocks_file:  # written whole, then renamed: the test never reads half a number
            tmp = Path(_blocks_file + ".tmp")
            tmp.write_text(str(_written[0]))
            tmp.replace(_blocks_file)
        time.sleep(_block_sleep)

    StoreWriter.write_block = _probed_write_block

atexit.register(lambda: print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr, flush=True))
sys.argv[0] = "vlcache"
main()
