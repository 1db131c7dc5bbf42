"""The original project's command: `python train.py [flags]` is `pocketlm train [flags]`."""

import sys

from pocketlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
