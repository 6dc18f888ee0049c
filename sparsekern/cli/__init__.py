"""``sparsekern COMMAND ...``: one module per command, each with its own ``main(argv)``,
imported only when its command runs (mace-train imports MACE, finetune SevenNet)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "finetune": ("finetune", "fine-tune a foundation model (sparse delta, full, LoRA) and evaluate it"),
    "mace-train": ("mace_train", "MACE's own mace_run_train with the sparse-delta flags"),
    "report": ("report", "where an adapter's update went: density by layer, path, l and element"),
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``, exit 2), like the
    commands' other refusals, not the whole usage first; --help still shows it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _usage() -> str:
    lines = ["usage: sparsekern COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`sparsekern COMMAND --help` describes one command; `sparsekern --version` says which sparsekern."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"sparsekern {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"sparsekern: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
        return int(module.main(argv[1:]) or 0)
    except KeyboardInterrupt:  # (a run in progress says more itself: how to resume)
        print(f"\nsparsekern {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
