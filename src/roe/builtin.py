"""The built-in model family shipped in the package (see `roe train-builtin`)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
SIZES = ("s", "m", "l")
DEFAULT_SIZE = "s"
PROFILE = "roe_profile.json"
# the built-in tokenizers' chat template: the plain format `roe serve` uses for a tokenizer without one
# ("System: ...\nUser: ...\nAssistant:"), so that vLLM's server (which needs a template) chats the same way
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in names -%}"
    "{{ raise_exception('unknown chat role: ' + m['role']) }}{%- endif -%}"
    "{{ names[m['role']] }}: {{ m['content'] }}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "Assistant:{%- endif -%}"
)


class BuiltinPath(str):
    """A checkpoint folder as a str (what vLLM's `LLM(model=...)` and other str-only APIs take) that still joins
    with `/` like a Path: `builtin_path("s") / "config.json"`."""

    def __truediv__(self, other) -> Path:
        return Path(self) / other

    def __fspath__(self) -> str:
        return str(self)


def builtin_path(name: str = DEFAULT_SIZE) -> BuiltinPath:
    """The checkpoint folder of a built-in model size ("s", "m" or "l"), as a str that joins like a Path."""
    if name not in SIZES:
        raise ValueError(f"unknown built-in model size {name!r}; choose one of {', '.join(SIZES)}")
    path = BUILTIN_DIR / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"built-in model '{name}' is not in this installation ({path}); train it with `roe train-builtin --size {name}`"
        )
    return BuiltinPath(path)


def resolve_model(name_or_path: str):
    """Map `builtin` / `builtin:SIZE` to its folder and default RoE profile; other names pass through."""
    from .config import RoEConfig

    if name_or_path == "builtin" or name_or_path.startswith("builtin:"):
        size = name_or_path.partition(":")[2] or DEFAULT_SIZE
        path = builtin_path(size)
        profile = path / PROFILE
        return str(path), (RoEConfig.from_profile(profile) if profile.exists() else None)
    return name_or_path, None
