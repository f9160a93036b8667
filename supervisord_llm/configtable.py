"""The one reader of the config's TOML tables: typed values, and errors that name file, key and what is valid.

Room: config. Every section (``[daemon]``, ``[[engine]]``, ``[policies.*]``, ``[probes]``,
``[gateway]``, ``[alerts]``) is read through :class:`Table`, so every mistake reads the same way:
``FILE: KEY: what is wrong; what would be valid``. It imports only the unit converters and the
errors, so the modules that own a section (``gateway``, ``alerts``) can use it without a cycle.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from supervisord_llm.convert import parse_duration_s, parse_size_bytes
from supervisord_llm.errors import ConfigError

T = TypeVar("T")

# Every comparison with NaN is false, so a NaN passes any `<` or `>=` check after it: the readers refuse
# values that are not finite first. Beyond these limits a value is a typo, not a setting: no timer here
# needs a year, no machine holds a petabyte (and an infinite stop grace would never end).
MAX_DURATION_S = 365 * 86400.0
MAX_SIZE_BYTES = 10**15
_MAX_DURATION_TEXT = "365d"
_MAX_SIZE_TEXT = '1PB ("1000TB", 10^15 bytes)'


class Table:
    """A view of one TOML table that reads typed values and names file and key in every error."""

    def __init__(self, data: object, file: str | None, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table, got {type(data).__name__}", file=file, key=path)
        self.data = data
        self.file = file
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key=self.key(name))

    def has(self, name: str) -> bool:
        return name in self.data

    def check_unknown(self, allowed: Iterable[str]) -> None:
        """Every key here is one of ``allowed`` (a set is listed sorted, a sequence in its own order)."""
        valid = sorted(allowed) if isinstance(allowed, (set, frozenset)) else list(allowed)
        unknown = sorted(set(self.data) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]!r}; valid keys here: {', '.join(valid)}",
                file=self.file,
                key=self.key(unknown[0]),
            )

    def sub(self, name: str) -> Table:
        return Table(self.data.get(name, {}), self.file, self.key(name))

    def _get(self, name: str, default: Any, required: bool) -> Any:
        if name not in self.data:
            if required:
                raise self.error(name, "is required")
            return default
        return self.data[name]

    def str(self, name: builtins.str, default: builtins.str | None = None, *, required: builtins.bool = False,
            choices: tuple[builtins.str, ...] | None = None) -> builtins.str | None:
        value = self._get(name, default, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__} {value!r}")
        if choices is not None and value not in choices:
            raise self.error(name, f"{value!r} is not valid; expected one of: {', '.join(choices)}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def int(self, name: builtins.str, default: builtins.int | None = None, *, required: builtins.bool = False,
            min_value: builtins.int | None = None, max_value: builtins.int | None = None) -> builtins.int | None:
        value = self._get(name, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {type(value).__name__} {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(name, f"must be at least {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise self.error(name, f"must be at most {max_value}, got {value}")
        return value

    def float(self, name: builtins.str, default: builtins.float, *, min_value: builtins.float | None = None,
              max_value: builtins.float | None = None) -> builtins.float:
        value = self._get(name, default, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            if min_value is not None and max_value is not None:
                valid = f"a number from {min_value:g} to {max_value:g}"
            elif min_value is not None:
                valid = f"a number of at least {min_value:g}"
            elif max_value is not None:
                valid = f"a number of at most {max_value:g}"
            else:
                valid = "a finite number"
            raise self.error(name, f"expected {valid}, got {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(name, f"must be at least {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise self.error(name, f"must be at most {max_value}, got {value}")
        return float(value)

    def duration_s(self, name: builtins.str, default: builtins.str | builtins.float, *, min_s: builtins.float | None = None,
                   why: builtins.str = "", positive: builtins.bool = False,
                   max_s: builtins.float | None = None) -> builtins.float:
        value = self._get(name, default, False)
        try:
            seconds = parse_duration_s(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from exc
        if not math.isfinite(seconds):
            raise self.error(name, f'must be a finite duration of at most {_MAX_DURATION_TEXT}, e.g. "90s" or "5m", '
                                   f"got {value!r}")
        if seconds > MAX_DURATION_S and (max_s is None or max_s > MAX_DURATION_S):
            raise self.error(name, f"must be at most {_MAX_DURATION_TEXT}, got {value!r}")
        if min_s is not None and seconds < min_s:
            reason = f" ({why})" if why else ""
            raise self.error(name, f"must be at least {min_s:g}s{reason}, got {value!r}")
        if positive and seconds <= 0:
            raise self.error(name, f"must be greater than 0, got {value!r}; e.g. \"30s\"")
        if max_s is not None and seconds > max_s:
            raise self.error(name, f"must be at most {max_s:g}s, got {value!r}")
        return seconds

    def size_bytes(self, name: builtins.str, default: builtins.str | builtins.int | None, *, allow_auto: builtins.bool = False,
                   positive: builtins.bool = False) -> builtins.int | None:
        """A size; ``None`` means "auto" where allowed; ``positive``: at least one byte."""
        value = self._get(name, default, False)
        if value is None:
            return None
        if allow_auto and value == "auto":
            return None
        try:
            size = parse_size_bytes(value)
        except OverflowError:  # digits beyond a float: infinity, which no int holds
            size = MAX_SIZE_BYTES + 1
        except ValueError as exc:
            message = str(exc)
            if allow_auto:  # 'expected a size such as ... or "auto", got ...'
                head, got, rest = message.rpartition(", got ")
                message = f'{head} or "auto"{got}{rest}' if got else f'{message} (or "auto")'
            raise self.error(name, message) from exc
        if size > MAX_SIZE_BYTES:
            raise self.error(name, f"must be at most {_MAX_SIZE_TEXT}, got {value!r}")
        if positive and size < 1:
            auto = ' (or "auto")' if allow_auto else ""
            raise self.error(name, f'must be above zero, such as "120GB"{auto}, got {value!r}')
        return size

    def construct(self, factory: Callable[..., T], keys: Mapping[builtins.str, builtins.str], /, **fields: Any) -> T:
        """``factory(**fields)``: a settings object that validates itself when constructed.

        Its ValueError becomes the config error of the key that set the field it names first (``keys`` maps
        each field to its key in this table), else of this table: a check the readers missed is still a
        config error, never a traceback.
        """
        try:
            return factory(**fields)
        except ValueError as exc:
            message = str(exc)
            named = [(match.start(), key) for field_name, key in keys.items()
                     if (match := re.search(rf"\b{re.escape(field_name)}\b", message))]
            if named:
                raise self.error(min(named)[1], message) from None
            raise ConfigError(message, file=self.file, key=self.path or None) from None

    def checked(self, name: builtins.str, check: Callable[[Any], T], default: Any = None) -> T:
        """The value (or ``default``) passed through ``check``, whose ValueError becomes this key's error."""
        try:
            return check(self._get(name, default, False))
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def secret(self, name: builtins.str, environ: Mapping[builtins.str, builtins.str], *,
               required_help: builtins.str | None = None) -> tuple[Any, builtins.str]:
        """A secret given as ``name`` or as ``name_env`` (the environment variable that holds it).

        Returns the raw value and the key it came from (for the error of a check that follows);
        ``None`` when neither is set, unless ``required_help`` says what to set.
        """
        env_key = f"{name}_env"
        if name in self.data and env_key in self.data:
            raise self.error(name, f"set either {name} or {env_key}, not both")
        if env_key in self.data:
            variable = self.data[env_key]
            if not isinstance(variable, builtins.str) or not variable:
                raise self.error(env_key, "expected the name of an environment variable")
            if variable not in environ:
                raise self.error(env_key, f"environment variable {variable} is not set")
            return environ[variable], env_key
        if name not in self.data and required_help is not None:
            raise self.error(name, f"missing; set {name} ({required_help}) or {env_key} "
                                   "(an environment variable holding it)")
        return self.data.get(name), name

    def str_list(self, name: builtins.str, default: list[builtins.str] | None = None) -> tuple[builtins.str, ...]:
        value = self._get(name, default or [], False)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings such as [\"--flag\", \"value\"], got {value!r}")
        for item in value:
            if "\0" in item:  # no argv of a process can hold one
                raise self.error(name, f"{item!r} holds a NUL character, which no process argument can carry")
        return tuple(value)

    def str_map(self, name: builtins.str) -> dict[builtins.str, builtins.str]:
        """A table of environment variables: names without '=' or NUL (what a process environment can hold)."""
        value = self._get(name, {}, False)
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(name, f"expected a table of strings such as {{ KEY = \"value\" }}, got {value!r}")
        for key, item in value.items():
            if not key or "=" in key or "\0" in key:
                raise self.error(name, f"{key!r} is not an environment variable name: it must be non-empty, without "
                                       "'=' or NUL, e.g. { OMP_NUM_THREADS = \"8\" }")
            if "\0" in item:
                raise self.error(name, f"the value of {key} holds a NUL character, which no environment can carry")
        return dict(value)


__all__ = ["MAX_DURATION_S", "MAX_SIZE_BYTES", "Table"]
