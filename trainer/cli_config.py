"""Command-line flags from (nested) config dataclasses, with each field's docstring as its --help.

One flag per leaf field. A nested dataclass field is a group whose flags carry its name and a dot:
`TrainConfig.compressor.num_memory_tokens` is `--compressor.num-memory-tokens`; underscores become
dashes; booleans take `--flag` / `--no-flag` (`--objective.use-top-k` / `--no-objective.use-top-k`).
The field's docstring (the string literal written right after it in the class body) is its help.

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    config = dataclass_from_args(TrainConfig, parser.parse_args(argv))

`override(config, {"objective.alpha": 0.5})` replaces fields by the same dotted names; `flatten(config)`
lists them with their values.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} of a dataclass (and its dataclass bases), read from the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no help texts
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _scalar_type(hint: Any) -> tuple[type, bool]:
    """(argparse type, is a tuple) of a field's type hint; `X | None` counts as X."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"unsupported union type {hint!r}")
        return _scalar_type(non_none[0])
    if origin is tuple:
        return _scalar_type(args[0])[0], True
    if hint in (int, float, str, bool):
        return hint, False
    raise TypeError(f"unsupported field type {hint!r}")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, default: Any = None, prefix: str = "", description: str = ""
) -> None:
    """Add one flag per (nested) field of dataclass `cls`; defaults from the instance `default` (else `cls()`).
    A nested dataclass field becomes an argument group titled by its dotted name, its docstring as description."""
    default = default if default is not None else cls()
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(prefix.rstrip("."), description or None) if prefix else parser
    for f in dataclasses.fields(cls):
        value, dest = getattr(default, f.name), prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_arguments(parser, hints[f.name], value, dest + ".", docs.get(f.name, ""))
            continue
        kind, is_tuple = _scalar_type(hints[f.name])
        flag = "--" + dest.replace("_", "-")
        help_text = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=value, nargs="+" if is_tuple else None,
                               help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """The (nested) dataclass `cls` built from flags that `add_dataclass_arguments` added."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = dataclass_from_args(hints[f.name], args, prefix + f.name + ".")
        else:
            value = getattr(args, prefix + f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"dotted.field": value} of every leaf field of a (nested) dataclass or of its asdict()."""
    items = (config.items() if isinstance(config, Mapping)
             else ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)))
    out: dict[str, Any] = {}
    for name, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
            out.update(flatten(value, prefix + name + "."))
        else:
            out[prefix + name] = value
    return out


def override(config: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of the (nested) dataclass with fields replaced by dotted name: {"aggregator.max_docs": 64}.
    Each dataclass is rebuilt once, so checks across fields (__post_init__) see all changes together."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"{type(config).__name__} has no field {head!r} (in {key!r})")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = override(direct.get(head, getattr(config, head)), sub)
    return dataclasses.replace(config, **direct)
