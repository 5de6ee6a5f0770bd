"""``python -m ifp_compile`` is the ``ifp-compile`` command."""

import sys

from .cli import main

sys.exit(main())
