"""The original project's command: `python inference.py [flags]` is `pocketlm generate [flags]`.

Without --prompt or --prompt-file it continues a default prompt (``pocketlm generate`` itself
would open an interactive prompt loop in a terminal). Without --checkpoint it uses the latest
checkpoint of the default run directory, runs/gpt2-125m.
"""

import sys

from pocketlm.cli import main


def _args(argv: list[str]) -> list[str]:
    asks_for_prompt = any(a in ("--prompt", "--prompt-file", "--help") or a.startswith(("--prompt=", "--prompt-file="))
                          for a in argv)
    if asks_for_prompt:
        return argv
    from pocketlm.console import DEFAULT_PROMPT

    return [*argv, "--prompt", DEFAULT_PROMPT]


if __name__ == "__main__":
    sys.exit(main(["generate", *_args(sys.argv[1:])]))
