"""YAML files and ``key.sub=value`` overrides onto the typed tree, and back to YAML.

Precedence: dataclass defaults < YAML file < command-line overrides. Both sources are merged
into one plain dict first; :func:`config_from_dict` then checks every key and type in one pass
and reports all problems together, each under its full dotted key.

- Override values are parsed with ``yaml.safe_load`` (``true``, ``[a,b]``, ``null``), then
  coerced to the field's type; a ``str`` field takes the text as typed (``run.output_dir=2024``
  is the string "2024"). PyYAML reads ``1e-6`` as a string: float fields accept it.
- ``${VAR}`` / ``${VAR:-default}`` in string values are expanded from the environment when a
  config is loaded, so paths that differ per cluster are named variables in the shipped YAML.
- Bare aliases: ``output_dir=DIR`` is ``run.output_dir=DIR``, ``seed=N`` is ``run.seed=N``.
- Secrets: configs name environment variables (``rollout.sglang.api_key_env``), never hold
  keys; :func:`save_resolved` still redacts any string that looks like one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union

import yaml

from sapo_megatron.config.schema import MODEL_SECTION_KEYS, ModelSection, TrainConfig
from sapo_megatron.models.config import ModelConfig

ALIASES = {"output_dir": "run.output_dir", "seed": "run.seed"}
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """One or more problems in a configuration, each naming its dotted key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Defaults < YAML file at ``path`` < ``key.sub=value`` overrides; checked and validated
    (everything that does not depend on the world size: see ``validate_for_world``)."""
    from sapo_megatron.config.validate import validate

    # Defaults are filled in when the tree is built, not copied here: some are derived in
    # __post_init__ (parallel.sequence_parallel follows TP) and must stay derived.
    data: dict[str, Any] = {}
    if path is not None:
        _deep_merge(data, read_yaml(path))
    problems: list[str] = []
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ValueError as err:
            problems.append(str(err))
            continue
        _set_dotted(data, key, value, problems)
    if problems:
        raise ConfigError(problems)
    data = _expand_env(data, dict(os.environ) if env is None else env, "", problems)
    if problems:
        raise ConfigError(problems)
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg


def config_from_argv(argv: list[str]) -> TrainConfig:
    """``[--config PATH] [key=value ...]`` (the ``train`` command's arguments) -> config."""
    path, overrides, problems = None, [], []
    items = iter(argv)
    for arg in items:
        if arg == "--config":
            path = next(items, None)
            if path is None:
                problems.append("--config needs a path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            problems.append(f"unexpected argument {arg!r}: expected --config PATH or key.sub=value")
    if problems:
        raise ConfigError(problems)
    return load_config(path, overrides)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections at the top level, got "
                           f"{type(data).__name__}"])
    return data


class _OverrideValue:
    """A value from the command line: the text as typed and its YAML parse."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.parsed = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            self.parsed = text

    def __repr__(self) -> str:
        return repr(self.text)


def parse_override(item: str) -> tuple[str, Any]:
    """``"loss.tau_neg=1.05"`` -> ``("loss.tau_neg", <1.05>)``; aliases resolved."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    return ALIASES.get(key, key), _OverrideValue(text)


def _deep_merge(base: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _set_dotted(data: dict, key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            problems.append(f"override {key}: {where} is a value, not a section")
            return
        node = child
    node[parts[-1]] = value


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, env: Mapping[str, str], key: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, env, f"{key}.{k}" if key else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, key, problems) for v in value]
    if isinstance(value, _OverrideValue):
        if isinstance(value.parsed, str) and _ENV_REF.search(value.text):
            expanded = _OverrideValue.__new__(_OverrideValue)
            expanded.text = expanded.parsed = _expand_env(value.text, env, key, problems)
            return expanded
        return value
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{key}: environment variable {name} is not set (the value is "
                        f"{value!r}); export {name} or override {key}=...")
        return match.group(0)

    return _ENV_REF.sub(substitute, value)


# --------------------------------------------------------------------------- dict <-> tree


def config_to_dict(cfg: TrainConfig, *, resolved: bool = False) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (YAML-ready). ``resolved=True`` writes the model section as
    the full :class:`ModelConfig` it resolves to, not only the fields that were set."""
    data = _plain(cfg)
    model = data.pop("model")
    fields = cfg.model.resolve() if resolved else None
    data["model"] = {key: model[key] for key in MODEL_SECTION_KEYS}
    data["model"].update(_plain(fields) if fields is not None else model["overrides"])
    return {key: data[key] for key in (f.name for f in dataclasses.fields(TrainConfig))}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The typed tree from a plain dict (any subset of keys; the rest default). Unknown keys,
    wrong types and out-of-range values are all reported together as a :class:`ConfigError`."""
    problems: list[str] = []
    data = dict(data)
    model = data.pop("model", {})
    cfg = _build(TrainConfig, {**data, "model": {}}, "", problems)
    section = _build_model_section(model, problems)
    if problems:
        raise ConfigError(problems)
    cfg.model = section
    return cfg


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{prefix}: expected a mapping of {cls.__name__} settings, got {data!r}")
        return None
    count = len(problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(_unknown(dotted, str(key), list(fields), prefix or "the top level"))
            continue
        try:
            if dataclasses.is_dataclass(hints[key]):
                kwargs[key] = _build(hints[key], value, dotted, problems)
            elif "passthrough" in fields[key].metadata:
                kwargs[key] = _passthrough(value, dotted, _field_names(fields[key].metadata["passthrough"]))
            else:
                kwargs[key] = coerce(value, hints[key], dotted)
        except ValueError as err:
            problems.append(str(err))
    if len(problems) > count:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        named = not prefix or message.startswith(prefix.split(".")[0])
        problems.append(message if named else f"{prefix}: {message}")
        return None


def _build_model_section(data: Any, problems: list[str]) -> ModelSection | None:
    if not isinstance(data, Mapping):
        problems.append(f"model: expected a mapping (preset, hf_dir, ckpt_dir and ModelConfig "
                        f"fields), got {data!r}")
        return None
    section_hints = typing.get_type_hints(ModelSection)
    model_hints = typing.get_type_hints(ModelConfig)
    names = list(MODEL_SECTION_KEYS) + list(model_hints)
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    count = len(problems)
    for key, value in data.items():
        dotted = f"model.{key}"
        try:
            if key in MODEL_SECTION_KEYS:
                kwargs[key] = coerce(value, section_hints[key], dotted)
            elif key == "megatron":
                overrides[key] = _passthrough(value, dotted, _field_names(TRANSFORMER_CONFIG))
            elif key in model_hints:
                overrides[key] = coerce(value, model_hints[key], dotted)
            else:
                problems.append(_unknown(dotted, str(key), names, "model"))
        except ValueError as err:
            problems.append(str(err))
    if len(problems) > count:
        return None
    try:
        section = ModelSection(**kwargs, overrides=overrides)
        section.resolve()  # ModelConfig's own checks, with "model.x" in their messages
        return section
    except (ValueError, TypeError) as err:
        problems.append(str(err) if str(err).startswith("model") else f"model: {err}")
        return None


def _passthrough(value: Any, key: str, allowed: list[str]) -> dict[str, Any]:
    """A dict of upstream config fields, e.g. ``model.megatron``: names checked, values as given."""
    value = coerce(value, dict[str, Any], key)
    for name in value:
        if name not in allowed:
            raise ValueError(_unknown(f"{key}.{name}", name, allowed, key))
    return value


TRANSFORMER_CONFIG = "megatron.core.transformer.TransformerConfig"


def _field_names(qualified_class: str) -> list[str]:
    """Field names of an upstream config dataclass, imported only when a passthrough is used."""
    import importlib

    module, _, name = qualified_class.rpartition(".")
    return [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]


def _unknown(dotted: str, key: str, valid: list[str], where: str) -> str:
    parent = dotted[: -len(key)]
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"; did you mean {' or '.join(repr(parent + c) for c in close)}?" if close else ""
    if len(valid) > 40:  # an upstream config class: its field list would drown the message
        return f"unknown key {dotted!r}{hint} (not one of the {len(valid)} fields accepted under {where})"
    return f"unknown key {dotted!r}{hint} (valid keys under {where}: {', '.join(sorted(valid))})"


# --------------------------------------------------------------------------- types


_NONE_WORDS = ("none", "None", "null", "~")


def coerce(value: Any, expected: Any, key: str) -> Any:
    """``value`` as type ``expected`` (int, float, bool, str, Any, Optional/Union, list, tuple,
    dict, Literal), or ValueError naming ``key``, the value and the expected type."""
    text = value.text if isinstance(value, _OverrideValue) else None
    if isinstance(value, _OverrideValue):
        value = value.parsed
    origin, args = typing.get_origin(expected), typing.get_args(expected)

    def fail() -> ValueError:
        shown = text if text is not None else value
        return ValueError(f"{key}: expected {type_name(expected)}, got {shown!r}")

    if expected is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value in _NONE_WORDS)):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value if text is None else _raw(text, value), option, key)
            except ValueError:
                pass
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{key}: expected one of {list(args)}, got {text if text is not None else value!r}")
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise fail()
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if expected is str:
        if text is not None and value is not None and not isinstance(value, (list, dict)):
            return text
        if isinstance(value, str):
            return value
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or expected is dict:
        if not isinstance(value, Mapping):
            raise fail()
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    raise ValueError(f"{key}: unsupported field type {expected!r}")


def _raw(text: str, parsed: Any) -> _OverrideValue:
    raw = _OverrideValue.__new__(_OverrideValue)
    raw.text, raw.parsed = text, parsed
    return raw


def type_name(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        expected, getattr(expected, "__name__", str(expected)))


# --------------------------------------------------------------------------- saving


def save_resolved(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write every field of ``cfg`` (model fully resolved) as YAML, secrets redacted; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(redact(config_to_dict(cfg, resolved=True)), sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("# Resolved configuration of this run (sapo_megatron). Re-run with --config.\n" + body)
    os.replace(tmp, path)
    return path


_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials",
                 "auth"}
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|gho_|github_pat_|xox[abp]-|AKIA|glpat-)[A-Za-z0-9_\-]{12,}$")
_URL_PASSWORD = re.compile(r"^(\w+://[^/:@\s]+):[^/@\s]+@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact(data: Any, key: str = "") -> Any:
    """A copy of ``data`` with secret-looking strings replaced by ``<redacted>``: values of keys
    named like *key* / *token* / *secret* / *password* (except ``*_env`` keys holding a
    variable name), values shaped like well-known tokens, and passwords inside URLs."""
    if isinstance(data, Mapping):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, key) for v in data]
    if not isinstance(data, str) or not data:
        return data
    words = set(re.split(r"[_\-.]", key.lower()))
    names_a_variable = key.lower().endswith("_env") and _ENV_NAME.fullmatch(data)
    if (words & _SECRET_WORDS and not names_a_variable) or _SECRET_VALUE.match(data):
        return REDACTED
    return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", data)
