"""Booleans are not numbers: TOML's `true` where a field wants an int or a float is a mistake, but pydantic's
lax mode reads it as 1 (`k = true` would train SAEs with k = 1).

Pydantic's strict mode rejects it, but also every TOML array given for a tuple field (``sae.train.betas``),
and the SAE library's own models (``tide_core.sae.spec``, embedded in ``[sae]``) are not ours to configure.
So the check walks the raw TOML mapping along the config's annotations instead: every int or float field of
every section, nested models, lists, tuples and dict values included, whoever declared it.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel


def bools_for_numbers(data: dict, model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted fields of ``data`` (a config mapping for ``model``) that hold a boolean where the field
    takes an int or a float. Unknown keys are skipped: validation names them."""
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is not None:
            found += _check(value, field.annotation, f"{prefix}{key}")
    return found


def _check(value: Any, ann: Any, where: str) -> list[str]:
    if isinstance(value, bool):
        leaves = _leaves(ann)
        return [where] if bool not in leaves and (int in leaves or float in leaves) else []
    options = _options(ann)
    if isinstance(value, dict):
        for opt in options:
            if isinstance(opt, type) and issubclass(opt, BaseModel):
                return bools_for_numbers(value, opt, f"{where}.")
            if typing.get_origin(opt) is dict:
                return [w for k, v in value.items() for w in _check(v, typing.get_args(opt)[1], f"{where}.{k}")]
    if isinstance(value, list):
        for opt in options:
            origin, args = typing.get_origin(opt), typing.get_args(opt)
            if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
                return [w for i, v in enumerate(value) for w in _check(v, args[0], f"{where}.{i}")]
            if origin is tuple:  # a wrong length is validation's to report
                pairs = enumerate(zip(value, args, strict=False))
                return [w for i, (v, a) in pairs for w in _check(v, a, f"{where}.{i}")]
    return []


def _options(ann: Any) -> list[Any]:
    """The members of a union (``X | None``), each without its ``Annotated`` constraints."""
    if typing.get_origin(ann) is Annotated:
        return _options(typing.get_args(ann)[0])
    if typing.get_origin(ann) in (Union, types.UnionType):
        return [o for a in typing.get_args(ann) for o in _options(a)]
    return [ann]


def _leaves(ann: Any) -> set[Any]:
    """The scalar types a field accepts; a Literal contributes the types of its values."""
    out = set()
    for opt in _options(ann):
        out |= {type(v) for v in typing.get_args(opt)} if typing.get_origin(opt) is Literal else {opt}
    return out
