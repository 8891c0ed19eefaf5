"""Reading the config file: TOML, validation with errors that name the field, paths resolved once against
the file's folder, and ``explain`` for ``tide config --explain``."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ValidationError

from tide_core.config.base import BUILT_HERE, CONFIG_ENV, DEFAULT_CONFIG_NAME, ConfigError
from tide_core.config.numbers import bools_for_numbers
from tide_core.config.run import TideConfig

# Every list of the config names work to do (layers, sites, variants, steps, ...): an empty one would make its
# stage do nothing, so the fields declare min_length=1 and this says so in the user's words.
_EMPTY = "is empty, so its stage would do nothing: list at least one value, or remove the key for the default"


def _error_lines(err: ValidationError, skip: set[str]) -> list[str]:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if where in skip:
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `tide config --explain` lists every field)"
        elif e["type"] == "too_short":
            msg = _EMPTY
        got = "" if e["type"] in ("extra_forbidden", "value_error", "too_short") else f" (got {e.get('input')!r})"
        lines.append(f"  {where}: {msg}{got}")
    return lines


def parse_config(data: dict, origin: str = "<dict>") -> TideConfig:
    """Validate a config mapping; raise ConfigError naming each bad field. Paths stay as given."""
    bools = bools_for_numbers(data, TideConfig)
    lines = [f"  {where}: true/false where a number is expected (write a number, e.g. 1 or 0.5)" for where in bools]
    try:
        cfg = TideConfig.model_validate(data)
    except ValidationError as err:
        lines += _error_lines(err, skip=set(bools))
    if lines:
        raise ConfigError(f"invalid config {origin}:\n" + "\n".join(lines))
    return cfg


def resolve_config_path(path: str | os.PathLike | None = None) -> Path | None:
    """The config file in force: the argument, else $TIDE_CONFIG, else ./tide.toml if present."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.exists() else None


def is_local_source(source: str, base_dir: Path) -> bool:
    """Whether model.source names a local directory (else a model built here, or a hub id): it exists
    relative to the config's folder, or it is written as a path (absolute, ./, ../ or ~)."""
    if source in BUILT_HERE:
        return False
    return (base_dir / source).expanduser().exists() or source.startswith(("/", "./", "../", "~"))


def resolve_paths(cfg: TideConfig, base_dir: Path) -> TideConfig:
    """The config with every relative path made absolute against ``base_dir`` (the config file's folder):
    warehouse.root, a local warehouse.store_url, the checkpoint directories of the models built here, the
    prompt file and a local model.source."""

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base_dir / q).resolve())

    data = cfg.model_dump()
    data["warehouse"]["root"] = absolute(cfg.warehouse.root)
    url = cfg.warehouse.store_url
    if url is not None and "://" not in url:
        data["warehouse"]["store_url"] = absolute(url)
    data["model"]["digits"]["checkpoint_dir"] = absolute(cfg.model.digits.checkpoint_dir)
    for built in ("styled_digits", "tiny_pixart", "tiny_sd3", "tiny_flux"):
        data["model"][built]["checkpoint_dir"] = absolute(getattr(cfg.model, built).checkpoint_dir)
    if cfg.sampling.prompts is not None:
        data["sampling"]["prompts"] = absolute(cfg.sampling.prompts)
    if is_local_source(cfg.model.source, base_dir):
        data["model"]["source"] = absolute(cfg.model.source)
    return TideConfig.model_validate(data)


def load_config(path: str | os.PathLike | None = None) -> TideConfig:
    """Load and validate the run config (see resolve_config_path for which file), its relative paths
    resolved against the file's folder (the working directory when no file is in force)."""
    resolved = resolve_config_path(path)
    if resolved is None:
        return resolve_paths(TideConfig(), Path.cwd())
    if not resolved.is_file():
        raise ConfigError(f"config file {resolved} does not exist (set --config or ${CONFIG_ENV})")
    try:
        text = resolved.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # NUL is valid UTF-8, but no text file holds it: a binary given by mistake
        raise ConfigError(f"config file {resolved} is not text (not UTF-8): a config must be a UTF-8 TOML file; "
                          "point --config at one (e.g. tide.toml)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {resolved} is not valid TOML: {err}") from None
    return resolve_paths(parse_config(data, origin=str(resolved)), resolved.resolve().parent)


def explain(model: type[BaseModel] = TideConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default, docstring (for `tide config --explain`)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"[{dotted}]  {field.description or ''}")
            out.extend(explain(ann, dotted + "."))
        else:
            default = field.get_default(call_default_factory=True)
            out.append(f"  {dotted} = {default!r}  # {field.description or ''}")
    return out
