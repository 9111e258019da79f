"""``python -m dyncnn.cli``: the ``dyncnn`` command (e.g. ``torchrun --nproc_per_node=2 -m dyncnn.cli train ...``)."""
import sys

from . import main

sys.exit(main())
