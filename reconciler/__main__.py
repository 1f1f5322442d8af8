"""``python -m reconciler`` is the ``reconciler`` command."""

import sys

from .cli import main

sys.exit(main())
