"""The ``kolorun`` console command: exec the launcher binary bundled in the wheel."""

import os
import sys
from pathlib import Path


def launcher_path():
    """The bundled kolorun binary (built from the repository's src/bin/kolorun.rs)."""
    return Path(__file__).resolve().parent / "_bin" / "kolorun"


def main():
    exe = launcher_path()
    if not exe.exists():
        sys.exit(f"kolorun: the bundled launcher {exe} is missing (was the package built with cargo?)")
    # exec: signals and the exit status are the launcher's own.
    os.execv(str(exe), [str(exe), *sys.argv[1:]])


if __name__ == "__main__":
    main()
