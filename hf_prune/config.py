"""`PruningConfig`: the base of every method's configuration, and the open method registry.

A config is a keyword-only dataclass. It validates itself at construction (so bad input fails before any work),
round-trips through JSON with a version stamp, and drops unknown keys with a warning so that configs written by a
newer hf_prune still load. Methods register under a string key; third parties can register their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from .version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "pruning_config.json"

_METHOD_REGISTRY: dict[str, type["PruningConfig"]] = {}


def register_pruning_method(name: str, *, override: bool = False):
    """Class decorator registering a `PruningConfig` subclass under `name`.

    Example:

    ```python
    @register_pruning_method("my_method")
    @dataclass(kw_only=True)
    class MyConfig(PruningConfig):
        strength: float = 0.5
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_pruning_method: name must be a non-empty string, got {name!r}")

    def decorator(cls: type[PruningConfig]) -> type[PruningConfig]:
        if not (isinstance(cls, type) and issubclass(cls, PruningConfig)):
            raise TypeError(f"register_pruning_method({name!r}) decorates PruningConfig subclasses, got {cls!r}")
        existing = _METHOD_REGISTRY.get(name)
        if existing is not None and existing is not cls and not override:
            raise ValueError(
                f"Pruning method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                "pass override=True to replace it."
            )
        cls.method = name
        _METHOD_REGISTRY[name] = cls
        return cls

    return decorator


def get_config_class(method: str) -> type["PruningConfig"]:
    """Returns the config class registered under `method`, or raises naming the registered methods."""
    try:
        return _METHOD_REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"Unknown pruning method {method!r}; registered methods: {sorted(_METHOD_REGISTRY)}"
        ) from None


def registered_methods() -> list[str]:
    return sorted(_METHOD_REGISTRY)


@dataclass(kw_only=True)
class PruningConfig:
    """Base class of all pruning configurations.

    Subclasses are keyword-only dataclasses registered with [`register_pruning_method`]. Validation lives in
    `validate()`, which `__post_init__` calls, so an invalid config can never be constructed.
    """

    method: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises `ValueError` naming the offending field. Subclasses extend it (and call `super().validate()`)."""

    # ----------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "hf_prune_version": __version__}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        """Builds the config; on the base class, dispatches on `data["method"]` through the registry."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        data.pop("hf_prune_version", None)
        target = cls
        if method is not None:
            target = get_config_class(method)
            if not issubclass(target, cls):
                raise ValueError(f"Config of method {method!r} is a {target.__name__}, not a {cls.__name__}")
        elif cls is PruningConfig or not cls.method:
            raise ValueError("Config dict has no 'method' key; cannot tell which pruning method it describes")
        known = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown keys for %s: %s", target.__name__, unknown)
        return target(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PruningConfig":
        """Loads from a directory holding `pruning_config.json`, or from a JSON file path."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No pruning config at {file!r}")
        with open(file, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "PruningConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------- validation helpers
def check_open_unit_interval(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{owner}.{name} must be a number in the open interval (0, 1), got {value!r}")


def check_positive_int(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


def check_positive_number(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a number {bound}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")
