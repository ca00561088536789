"""``python -m atlasfl.cli``: the ``atlasfl`` command."""

import sys

from atlasfl.cli import main

sys.exit(main())
