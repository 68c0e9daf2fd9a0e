"""Reading YAML while remembering where each value came from.

:func:`read_yaml` composes a file into nodes (never plain Python values), so every
value keeps its line; a :class:`Value` is a node with its :class:`Where` (file,
service, dotted key path) and reads itself as a string, a number, a list or a
mapping, raising a :class:`ConfigError` that names all four.  A
:class:`YamlMapping` hands its keys out one by one and rejects the ones nobody
took.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import yaml


class ConfigError(Exception):
    """A configuration mistake, located as precisely as we know it."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        service: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.service = service
        self.key = key

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.service is not None:
            parts.append(f"service {self.service!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return ": ".join(parts) + ": " + self.message

@attrs.frozen
class Where:
    """The file, service and key path of a node, for error messages."""

    file: str
    service: str | None = None
    key: str | None = None

    def child(self, key: str) -> Where:
        return attrs.evolve(self, key=key if self.key is None else f"{self.key}.{key}")

    def error(self, node: yaml.Node | None, message: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, self.file, line, self.service, self.key)


@attrs.frozen
class Value:
    """A YAML node with its location."""

    node: yaml.Node
    where: Where

    def error(self, message: str) -> ConfigError:
        return self.where.error(self.node, message)

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got a {_kind(self.node)}")
        try:
            return yaml.SafeLoader("").construct_object(self.node)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = getattr(e, "problem", None) or e
            raise self.error(f"cannot read value: {problem}") from None

    def string(self) -> str:
        value = self.scalar()
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {value!r}")
        return value

    def integer(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}")
        self._check_range(value, minimum, maximum)
        return value

    def number(self, minimum: float | None = None, maximum: float | None = None,
               positive: bool = False) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number (seconds), got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(f"must be greater than 0, got {value!r}")
        self._check_range(value, minimum, maximum)
        return float(value)

    def _check_range(self, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(f"must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be at most {maximum}, got {value!r}")

    def items(self) -> list[Value]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got a {_kind(self.node)}")
        return [Value(item, self.where) for item in self.node.value]

    def mapping(self) -> YamlMapping:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping (key: value), got a {_kind(self.node)}")
        return YamlMapping.from_node(self.node, self.where)

    def is_mapping(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag.endswith(":null")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "value"


class YamlMapping:
    """A YAML mapping whose keys are taken one by one; leftovers are errors."""

    def __init__(self, node: yaml.Node | None, where: Where,
                 values: dict[str, Value]) -> None:
        self.node = node
        self.where = where
        self.values = values
        self._taken: set[str] = set()

    @classmethod
    def from_node(cls, node: yaml.MappingNode, where: Where) -> YamlMapping:
        values: dict[str, Value] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise where.error(key_node, "keys must be plain strings")
            key = str(key_node.value)
            if key in values:
                raise where.child(key).error(
                    key_node, f"duplicate key (first given on line {key_lines[key]})"
                )
            values[key] = Value(value_node, where.child(key))
            key_lines[key] = key_node.start_mark.line + 1
        return cls(node, where, values)

    def merged_over(self, base: YamlMapping) -> YamlMapping:
        """This mapping's keys win; nested mappings are merged one level deep."""
        values = dict(base.values)
        for key, value in self.values.items():
            old = values.get(key)
            if old is not None and old.is_mapping() and value.is_mapping():
                merged = value.mapping().merged_over(old.mapping())
                values[key] = MergedValue(value.node, value.where, merged)
            else:
                values[key] = value
        return YamlMapping(self.node, self.where, values)

    def has(self, key: str) -> bool:
        return key in self.values

    def take(self, key: str) -> Value | None:
        self._taken.add(key)
        return self.values.get(key)

    def get(self, key: str, read: Callable[[Value], Any], default: Any) -> Any:
        value = self.take(key)
        if value is None or value.is_null():
            return default
        return read(value)

    def require(self, key: str, read: Callable[[Value], Any]) -> Any:
        value = self.take(key)
        if value is None or value.is_null():
            raise self.where.child(key).error(self.node, "is required")
        return read(value)

    def finish(self) -> None:
        """Reject unknown keys, naming the ones that are allowed."""
        for key, value in self.values.items():
            if key not in self._taken:
                allowed = ", ".join(sorted(self._taken))
                raise ConfigError(
                    f"unknown key {key!r} (allowed: {allowed})",
                    value.where.file,
                    _key_line(self.node, key, value),
                    value.where.service,
                    value.where.key,
                )


@attrs.frozen
class MergedValue(Value):
    """A mapping value assembled from a manifest and the pool file."""

    merged: YamlMapping = attrs.field(default=None)

    def mapping(self) -> YamlMapping:
        return YamlMapping(self.merged.node, self.where, dict(self.merged.values))

    def is_mapping(self) -> bool:
        return True


def _key_line(node: yaml.Node | None, key: str, value: Value) -> int:
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if key_node.value == key:
                return key_node.start_mark.line + 1
    return value.node.start_mark.line + 1


def read_yaml(path: str, where: Where) -> YamlMapping:
    service = where.service
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", path, service=service) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", path, service=service) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 ({e.reason})", path, service=service) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {e.problem or e}", path, line, service) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path, service=service) from None
    if node is None:
        raise ConfigError("file is empty; expected a mapping", path, 1, service)
    return Value(node, where).mapping()
