"""Run a console script in this process and write its peak RSS (VmHWM) to a file at exit.

`wait4`'s ru_maxrss is useless here: Linux carries the parent's resident size across fork and exec
into the child's figure, so a benchmark process holding torch would report its own size for every
child. VmHWM belongs to the exec'd process's own address space.

Usage: python -m bench.peak_rss OUTFILE SCRIPT [ARGS...]
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def _write_peak(out: Path) -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out.write_text(str(int(line.split()[1]) * 1024))


def main() -> None:
    out, script, *args = sys.argv[1:]
    atexit.register(_write_peak, Path(out))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
