"""``python -m pipelines.cli`` is the ``lorax`` command."""

import sys

from pipelines.cli import main

sys.exit(main())
