"""``python -m reconciler`` is the ``reconciler`` command."""

import sys

from reconciler.cli.main import main

sys.exit(main())
