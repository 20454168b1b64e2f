"""`python -m bitlab ...` (what torchrun launches)."""
import logging
import os
import sys

from bitlab.cli import main
from bitlab.train.torchrun import under_torchrun

code = main()
if under_torchrun():
    # A torchrun worker. Its work is done: files written atomically, the process group destroyed.
    # Gloo can still abort the process in C++ static destructors at interpreter exit ("terminate
    # called without an active exception", SIGABRT, seen here with other local services binding
    # ports beside the job), and torchrun then reports a finished run as failed and restarts it
    # under --max-restarts. So flush what is buffered and leave without that teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
