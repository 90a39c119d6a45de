"""The common tail of every benchmark script: the result as one JSON line, printed and written to --out.

Imported as ``benchmarks._report``: each script puts the repository root on sys.path before its package imports,
which also makes this module importable whether the script runs as ``python benchmarks/X.py``, is imported as
``benchmarks.X`` or (the throughput test) as a top-level module from benchmarks/.
"""

from __future__ import annotations

import json


def report(result: dict, out: str | None) -> str:
    """Print ``result`` as one JSON line (the line the scripts' callers parse) and, when ``out`` is given, write the
    same line (newline-terminated) to that file. Returns the line."""
    line = json.dumps(result)
    print(line)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
    return line
