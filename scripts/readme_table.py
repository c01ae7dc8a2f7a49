#!/usr/bin/env python3
"""Copy a pipeline report's table into README.md between two marker comments.

    python scripts/readme_table.py results/report.md RESULTS   # -> <!-- RESULTS:BEGIN --> ... <!-- RESULTS:END -->

The README's result tables are produced by the pipeline, never typed by hand: this script
only moves the report's Markdown table (and a line naming the report's source) into place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main(report: str, marker: str, readme: str = "README.md") -> None:
    text = Path(report).read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    if not table:
        raise SystemExit(f"{report} holds no table; run the pipeline first")
    block = "\n".join(
        [
            f"<!-- {marker}:BEGIN (generated from {report} by scripts/readme_table.py) -->",
            *table,
            f"<!-- {marker}:END -->",
        ]
    )
    r = Path(readme).read_text()
    pattern = re.compile(rf"<!-- {marker}:BEGIN.*?<!-- {marker}:END -->", re.S)
    if not pattern.search(r):
        raise SystemExit(f"README has no <!-- {marker}:BEGIN --> ... <!-- {marker}:END --> markers")
    Path(readme).write_text(pattern.sub(lambda _m: block, r))


if __name__ == "__main__":
    main(*sys.argv[1:])
