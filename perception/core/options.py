"""Typed command-line configuration: one dataclass per CLI, from which its flags, its YAML keys and
its validation are derived, and one merge of defaults < YAML < flags.

    @dataclass
    class NodeConfig:
        fps: float = opt(30.0, help="frames per second", check=positive)

    add_arguments(parser, NodeConfig)          # --fps FPS (default: 30.0)
    cfg = merge(NodeConfig, yaml_values, flag_values)

A field's flag is ``--field-name`` unless ``flag=`` says otherwise; its type comes from the
annotation (``bool`` becomes ``--x/--no-x``; ``parse=`` turns the flag's text into the value and its
``ValueError`` into an argparse error naming the flag). Flags default to None, so "not given" never
overrides the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["opt", "add_arguments", "merge", "validate", "flag_of", "given", "project", "parse_into", "positive",
           "at_least", "in_range", "Check"]

Check = tuple[Callable[[Any], bool], str]  # a predicate and the words for what it requires


def at_least(low: float) -> Check:
    """``check=at_least(1)``: the value must be ``>= low``."""
    return (lambda v: v >= low, f">= {low:g}")


def in_range(low: float, high: float, *, closed: bool = True) -> Check:
    """``check=in_range(0, 1)``: ``low <= value <= high`` (``closed=False``: ``< high``)."""
    if closed:
        return (lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")
    return (lambda v: low <= v < high, f"in [{low:g}, {high:g})")


positive: Check = (lambda v: v > 0, "> 0")  # ``check=positive``: the value must be > 0


def opt(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, help: str | None = None,
        choices: tuple | None = None, check: "Check | None" = None,
        flag: str | None = None, metavar: str | None = None, parse: Callable[[str], Any] | None = None,
        cli: bool = True, nargs: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field that is also a command-line option (``cli=False``: YAML/config only). A
    ``flag`` without leading dashes makes a positional argument (``nargs`` as argparse's); ``repeat``
    makes a repeatable flag whose values collect in a list."""
    metadata = {"option": {"help": help, "choices": choices, "check": check, "flag": flag, "metavar": metavar,
                           "parse": parse, "cli": cli, "nargs": nargs, "repeat": repeat}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get("option", {})


def flag_of(f: dataclasses.Field) -> str:
    return _meta(f).get("flag") or "--" + f.name.replace("_", "-")


def _base_types(annotation: Any) -> tuple[set, bool]:
    """(the annotation's non-None types, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = set(typing.get_args(annotation))
    else:
        args = {annotation}
    optional = type(None) in args
    return args - {type(None)}, optional


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (except ``cli=False`` fields and ``skip``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        if meta.get("cli") is False or f.name in skip:
            continue
        kinds, _ = _base_types(hints[f.name])
        positional = not flag_of(f).startswith("-")
        kwargs: dict[str, Any] = {} if positional else {"dest": f.name, "default": None}
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        if not positional and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True  # a field without a default is a required flag
        text = meta.get("help") or ""
        if text == argparse.SUPPRESS:
            kwargs["help"] = argparse.SUPPRESS
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            if default not in (None, "", [], ()) and "default" not in text:
                text = f"{text} (default: {_show(default)})" if text else f"default: {_show(default)}"
            kwargs["help"] = text
        if meta.get("repeat"):
            kwargs["action"] = "append"
            inner = [t for k in kinds for t in typing.get_args(k)]
            kinds = set(inner) or {str}
        if meta.get("parse") is not None:
            kwargs["type"] = _argparse_type(meta["parse"])
        elif kinds == {bool}:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif len(kinds) == 1 and next(iter(kinds)) in (int, float, str):
            kwargs["type"] = next(iter(kinds))
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(f), **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def given(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}


def merge(cls: type, *layers: dict[str, Any]) -> Any:
    """``cls`` defaults, then each layer in turn (later wins). A None in a layer is a value (e.g. a
    recipe's ``crop: None``); flags not given never reach a layer (see :func:`given`).
    Unknown keys are an error naming them."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return cls(**values)


def validate(cfg: Any) -> Any:
    """Every value against its declared type, choices and check; ValueError names the flag."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds, optional = _base_types(hints[f.name])
        name = flag_of(f)
        if value is None:
            if not optional:
                raise ValueError(f"{name} needs a value")
            continue
        if not any(_is_a(value, k) for k in kinds):
            expected = " or ".join(sorted(_kind_name(k) for k in kinds))
            raise ValueError(f"{name} must be {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got {value!r}")
        meta = _meta(f)
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        check = meta.get("check")
        if check is not None and not check[0](value):
            raise ValueError(f"{name} must be {check[1]}, got {value!r}")
    return cfg


def _is_a(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        inner = typing.get_args(kind)
        return isinstance(value, (list, tuple)) and all(
            any(_is_a(v, t) for t in inner if t is not Ellipsis) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _kind_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return "list of " + " or ".join(_kind_name(t) for t in typing.get_args(kind))
    if origin is tuple:
        return "pair"
    return getattr(kind, "__name__", str(kind))


def project(cls: type, config: Any, **overrides: Any) -> Any:
    """An instance of dataclass ``cls`` whose fields take the same-named attributes of ``config``
    (e.g. a stage's settings out of its CLI's config), ``overrides`` winning; fields ``config``
    lacks keep their defaults. One name per concept: nothing is copied or renamed by hand."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(config, f.name)}
    values.update(overrides)
    return cls(**values)


def parse_into(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None = None) -> Any:
    """``argv`` parsed by ``parser`` (built with :func:`add_arguments` for ``cls``) into a validated
    ``cls``: defaults < flags. argparse exits on a malformed flag; a value outside its declared range
    raises ValueError naming the flag (the caller prints it as its one error line)."""
    return validate(merge(cls, given(parser.parse_args(argv), cls)))
