"""`jaxdefense` entry point.

Subcommands live in a registry: name → `Command(help, module, prefix)`, where `module` defines
`<prefix>_arguments(parser)` and `<prefix>_command(args) -> int | None` (prefix defaults to
`add`/`run` style names `add_arguments` and `run`). Only the chosen command's module is
imported. A module that does not exist yet (or lacks the function) makes the command print
"not yet available" and exit 1; a plugin adds a command with `register(...)` — no if/else here.

Errors: a `JaxDefenseError` becomes one line "error: ..." on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from jaxdefense.errors import JaxDefenseError


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    module: str | None = None
    prefix: str | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None


COMMANDS: dict[str, Command] = {
    "train": Command("plain SFT of a model on data streams (one training loop)", "jaxdefense.commands", "train"),
    "data": Command("inspect, list or prepare data sources and streams", "jaxdefense.data.cli"),
    "immunize": Command("immunise a model with a defence", "jaxdefense.commands", "immunize"),
    "attack": Command("fine-tuning attacks on a (defended) model", "jaxdefense.commands", "attack"),
    "eval": Command("evaluate harmfulness, over-refusal, utility and collapse", "jaxdefense.commands", "eval"),
    "demo": Command("end-to-end demo: immunise, attack, evaluate, report", "jaxdefense.demo"),
    "build-base": Command("build the small aligned base model used by the demo", "jaxdefense.base_model"),
}


def register(
    name: str,
    help: str,
    *,
    module: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    run: Callable[[argparse.Namespace], int | None] | None = None,
) -> None:
    """Add or replace a subcommand: either a module path or (add_arguments, run) functions."""
    COMMANDS[name] = Command(help, module, None, add_arguments, run)


def _load(command: Command) -> tuple[Callable | None, Callable | None]:
    if command.run is not None:
        return command.add_arguments, command.run
    if command.module is None:
        return None, None
    try:
        mod: ModuleType = importlib.import_module(command.module)
    except ModuleNotFoundError as e:
        if e.name is not None and command.module.startswith(e.name):
            return None, None
        raise
    if command.prefix is None:
        return getattr(mod, "add_arguments", None), getattr(mod, "run", None)
    return getattr(mod, f"{command.prefix}_arguments", None), getattr(mod, f"{command.prefix}_command", None)


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="jaxdefense",
        description="Defences against harmful fine-tuning of open-weight LLMs, in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {}
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name != selected:
            continue
        add_arguments, run = _load(command)
        if add_arguments is not None:
            add_arguments(p)
        runners[name] = run
    return parser, runners


def _selected(argv: Sequence[str]) -> str | None:
    for token in argv:
        if token in COMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; as the process entry (argv None) it first re-executes under jemalloc when installed,
    else with glibc's huge-page tunable where that applies (`jaxdefense.allocator.tune_malloc`)."""
    entry = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if entry:
            from jaxdefense.allocator import tune_malloc

            tune_malloc()
        parser, runners = build_parser(_selected(argv))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        run = runners.get(args.command)
        if run is None:
            print(f"jaxdefense {args.command}: not yet available", file=sys.stderr)
            return 1
        rc = run(args)
        return int(rc or 0)
    except JaxDefenseError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
