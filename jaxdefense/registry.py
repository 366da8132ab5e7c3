"""Name → class registries for the two kinds of training objective: defences and attacks.

    @register_method("seam")           # or @register_attack("harmful_sft")
    @dataclasses.dataclass(frozen=True)
    class SEAM(Objective): ...

A registered class is a frozen dataclass of hyperparameters (see `jaxdefense.objective`); its
fields are the keys of the config section that names it (`method: {name: seam, beta: 1}`),
validated by the config engine. A user's own module registers the same way and is loaded with
`--import mymodule` (`import_modules`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path

from jaxdefense.errors import ConfigError


class Registry:
    """One kind of registered class ("method" or "attack")."""

    def __init__(self, kind: str, builtin: str):
        self.kind, self.builtin = kind, builtin
        self._classes: dict[str, type] = {}
        self._loaded = False

    def _load_builtin(self) -> None:
        """Import every module of the built-in package (by name: they import this module), so a new
        method or attack is one file that registers itself — no list to edit."""
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.builtin)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.builtin}.{info.name}")

    def register(self, name: str):
        """Class decorator: registers `cls` under `name` (a name is taken once)."""

        def wrap(cls):
            if name in self._classes and self._classes[name].__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} name {name!r} registered twice")
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return wrap

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self._classes)

    def get(self, name: str, *, key: str | None = None) -> type:
        self._load_builtin()
        if name not in self._classes:
            raise ConfigError(f"{key or self.kind}: unknown {self.kind} {name!r} (known: {', '.join(self.names())})")
        return self._classes[name]

    def __contains__(self, name: str) -> bool:
        self._load_builtin()
        return name in self._classes


METHODS = Registry("method", "jaxdefense.methods")
ATTACKS = Registry("attack", "jaxdefense.attacks")
REGISTRIES = {"method": METHODS, "attack": ATTACKS}
register_method = METHODS.register
register_attack = ATTACKS.register


def import_modules(names: Iterable[str]) -> None:
    """Import user modules (dotted names or .py paths) so their registrations run."""
    for name in names:
        path = Path(name)
        try:
            if name.endswith(".py"):
                if not path.is_file():
                    raise ConfigError(f"--import: file {name!r} does not exist")
                sys.path.insert(0, str(path.resolve().parent))
                importlib.import_module(path.stem)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"--import: cannot import {name!r} ({e})") from e
