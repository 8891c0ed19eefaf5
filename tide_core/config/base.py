"""Shared pieces of the config sections: the base class, the error type and the names of sites and
variants."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from tide_core.sae.spec import VARIANTS

CONFIG_ENV = "TIDE_CONFIG"
DEFAULT_CONFIG_NAME = "tide.toml"
DIGITS_SOURCE = "digits"
TINY_PIXART_SOURCE = "tiny-pixart"
TINY_SD3_SOURCE = "tiny-sd3"
TINY_FLUX_SOURCE = "tiny-flux"
STYLED_DIGITS_SOURCE = "styled-digits"
# sources that name a model built or trained locally
BUILT_HERE = (DIGITS_SOURCE, STYLED_DIGITS_SOURCE, TINY_PIXART_SOURCE, TINY_SD3_SOURCE, TINY_FLUX_SOURCE)
SITES = ("resid", "attn", "mlp", "cross", "resid_text")
# sites in a text stream (SD3's joint, FLUX's double- and single-stream blocks): a token axis of their own,
# the text sequence, stored whole with a per-sample mask of the positions that hold a prompt token
TEXT_SITES = ("resid_text",)
Site = Literal[SITES]  # a tuple subscript spells every member, so the names live in one place
Variant = Literal[VARIANTS]


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
