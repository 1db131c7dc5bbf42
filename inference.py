"""The original project's command: `python inference.py [flags]` is `pocketlm generate [flags]`."""

import sys

from pocketlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
