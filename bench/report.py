"""Write one benchmark's section into BENCHMARKS.md between its own markers.

Several benchmarks share the file; each owns a section `<!-- BEGIN name -->…<!-- END name -->`, so
re-running one benchmark replaces only its own figures.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# SimMerge benchmarks\n\nEvery figure below was produced by the command named in its section.\n"


def machine_description() -> str:
    """One line naming the machine, so figures are never quoted without it."""
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, Python {platform.python_version()}"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, title: str, command: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section `name` with `body`, stamped with command, machine and revision."""
    text = path.read_text() if path.exists() else HEADER
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine_description()}  \nRevision: {git_revision()}\n\n"
        f"{body.rstrip()}\n<!-- END {name} -->"
    )
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
