"""`refslm` command line. Each subcommand lives in the module that owns its concept.

The module of command NAME defines `NAME_arguments(parser)` and `NAME_command(args) -> int` (the
exit status). Modules are imported only when their command is run, so optional packages load only
when needed.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    # name: (module, help)
    "verify": ("refslm.golden", "check golden cases on installed backends, or another implementation's outputs"),
    "golden": ("refslm.golden", "golden suite tools: `golden export --format npz|npy DIR`"),
    "bench": ("refslm.bench", "benchmarks: loss, attention, gemm, model, paper"),
    "align": ("refslm.align", "show which teacher position supervises each student position"),
    "devices": ("refslm.backends.devices", "list OpenCL platforms and devices"),
}


def build_parser(argv: list[str] | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refslm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module of the command being run
            getattr(importlib.import_module(module_name), f"{name}_arguments")(p)
            p.set_defaults(module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(getattr(importlib.import_module(args.module), f"{args.command}_command")(args) or 0)
