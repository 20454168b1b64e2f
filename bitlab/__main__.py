"""`python -m bitlab ...` (what torchrun launches)."""
import sys

from bitlab.cli import main

sys.exit(main())
