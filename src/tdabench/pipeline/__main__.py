"""``python -m tdabench.pipeline <stage> ...`` is the ``tdabench`` console script."""

import sys

from tdabench.pipeline.cli import main

sys.exit(main())
