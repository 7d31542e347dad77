"""`PruningConfig`: the base of every method's configuration, and the open method registry.

A config is a keyword-only dataclass. It validates itself at construction and again on every field assignment (so
bad input fails before any work, and a config can never be made invalid afterwards), round-trips through JSON with
a version stamp, and drops unknown keys with a warning so that configs written by a newer hf_prune still load.
Methods register under a string key; third parties can register their own.

Every field is checked against its annotation by one shared helper ([`check_fields`]): the type (`bool` is never
an `int`), floats finite (NaN and inf are refused), and the regular expressions of fields declared with
`field(metadata=REGEX)` compiled. Each method's `validate()` adds only the ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "pruning_config.json"

#: `field(metadata=REGEX)`: every string in the field's value (the value, its list items, its dict keys) is a regex.
REGEX = {"hf_prune_regex": True}

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
        self._run_validation()
        object.__setattr__(self, "_hf_prune_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # Assignment re-validates the whole config; a refused value leaves the config as it was.
        if name.startswith("_") or not self.__dict__.get("_hf_prune_ready") or self.__dict__.get("_hf_prune_busy"):
            object.__setattr__(self, name, value)
            return
        before = dict(self.__dict__)
        object.__setattr__(self, name, value)
        try:
            self._run_validation()
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _run_validation(self) -> None:
        object.__setattr__(self, "_hf_prune_busy", True)
        try:
            self.validate()
        finally:
            object.__setattr__(self, "_hf_prune_busy", False)

    def validate(self) -> None:
        """Raises `ValueError` naming the offending field. Subclasses extend it (and call `super().validate()`).

        Runs at construction and on assignment; the entry points (`oneshot`, `attach`, `PruningTrainer`, ...) call it
        again, which catches lists or dicts changed in place.
        """
        check_fields(self)

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
def check_fields(config: "PruningConfig") -> None:
    """Checks every dataclass field of `config` against its type annotation: type, finiteness of floats, regexes.

    Raises `ValueError` naming `Owner.field`, what is allowed and the value given.
    """
    owner = type(config).__name__
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints.get(f.name, Any)
        problem = _type_problem(value, hint)
        if problem is not None:
            detail = "" if problem == _NOT_FINITE else problem  # "must be a finite number, got nan" says it already
            raise ValueError(f"{owner}.{f.name} must be {_describe(hint)}, got {value!r}{detail}")
        if f.metadata.get("hf_prune_regex"):
            for pattern in _strings_in(value):
                check_regex(owner, f.name, pattern)


def check_regex(owner: str, name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{owner}.{name}: {pattern!r} is not a valid regular expression ({err})") from None


_HINTS: dict[type, dict[str, Any]] = {}
_NOT_FINITE = ", which is not finite"


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # an annotation that cannot be resolved is left to the method's own checks
            _HINTS[cls] = {}
    return _HINTS[cls]


def _type_problem(value: Any, hint: Any) -> str | None:
    """`None` when `value` fits `hint`; else a suffix for the error ("" or ", which is not finite")."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, h) for h in typing.get_args(hint)]
        return None if None in problems else max(problems, key=len)
    if hint is type(None):
        return None if value is None else ""
    if hint is bool:
        return None if isinstance(value, bool) else ""
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else ""
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ""
        return None if math.isfinite(value) else _NOT_FINITE
    if hint is str:
        return None if isinstance(value, str) else ""
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return ""
        args = typing.get_args(hint)
        item = args[0] if args else Any
        for v in value:
            problem = _type_problem(v, item)
            if problem is not None:
                return f" (item {v!r}{problem})"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return ""
        key_hint, value_hint = (typing.get_args(hint) or (Any, Any))
        for k, v in value.items():
            for item, item_hint in ((k, key_hint), (v, value_hint)):
                problem = _type_problem(item, item_hint)
                if problem is not None:
                    return f" (entry {k!r}: {v!r}{problem})"
        return None
    return None  # other annotations: the method's validate() checks them


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is float:
        return "a finite number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "True or False"
    if hint is str:
        return "a string"
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        args = typing.get_args(hint)
        return f"a dict of {_describe(args[0])} to {_describe(args[1])}" if args else "a dict"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    return {float: "finite numbers", int: "integers", str: "strings", bool: "booleans"}.get(hint, _describe(hint))


def _strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [k for k in value if isinstance(k, str)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


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
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")
