"""Run the vlcache CLI as ``python -m vlcache`` would, and report on stderr whether torch was imported.

The last stderr line is ``torch imported: True|False``: the CLI's cheap checks (dataset JSON, paths,
device) must fail before the slow torch import.
"""

import atexit
import sys

from vlcache.cli import main

atexit.register(lambda: print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr, flush=True))
sys.argv[0] = "vlcache"
main()
