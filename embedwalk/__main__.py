"""``python -m embedwalk``: the ``embedwalk`` command."""

import sys

from embedwalk.cli import main

sys.exit(main())
