"""YAML files and ``key.sub=value`` overrides onto the typed tree (OmegaConf structured configs),
and back to YAML.

Precedence: dataclass defaults < YAML file < command-line overrides, i.e.
``OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path), from_dotlist(...))``,
then ``OmegaConf.to_object`` builds the dataclasses, so every ``__post_init__`` check runs (a
merge alone type-checks but accepts out-of-range values).

- Types, unknown keys and value parsing are OmegaConf's (``true``, ``[a,b]``, ``null``, ``1e-6``;
  a ``str`` field takes ``run.output_dir=2024`` as the string "2024"). Its errors are turned into
  one line per problem: the dotted key, what was given, what was expected; a source that fails
  is merged again key by key so that every problem is reported at once.
- Environment variables: ``${oc.env:VAR}`` / ``${oc.env:VAR,default}``. The shell-style
  ``${VAR}`` / ``${VAR:-default}`` of earlier configs is refused with the new spelling.
- The saved and shown config keeps every ``${oc.env:...}`` unresolved, so paths and secrets
  that come from the environment are never written; strings that look like secrets are
  redacted as well (configs name environment variables, e.g. ``rollout.sglang.api_key_env``).
- Bare aliases: ``output_dir=DIR`` is ``run.output_dir=DIR``, ``seed=N`` is ``run.seed=N``.
- Pass-through sections (``model.megatron``, ``optim.megatron``) are checked against the
  Megatron-Core dataclass they feed (``upstream.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sapo_megatron.config.errors import ConfigError
from sapo_megatron.config.schema import MODEL_SECTION_KEYS, ModelSection, TrainConfig
from sapo_megatron.config.upstream import check_passthrough, type_name, unknown_key
from sapo_megatron.config.validate import validate
from sapo_megatron.models.config import ModelConfig

ALIASES = {"output_dir": "run.output_dir", "seed": "run.seed"}
REDACTED = "<redacted>"
# Where a loaded config's ``${...}`` values came from: {path: (template, resolved value)}.
_TEMPLATES = "_sapo_interpolations"

Path_ = tuple[str | int, ...]  # a key path into the tree: ("rollout", "sglang", "urls", 0)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults < YAML file at ``path`` < ``key.sub=value`` overrides; checked and validated
    (everything that does not depend on the world size: see ``validate_for_world``)."""
    sources = [] if path is None else [_read_yaml(path)]
    problems: list[str] = []
    for item in overrides:
        try:
            sources.append(_parse_override(item))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    cfg = _build(sources)
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


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The typed tree from a plain dict (any subset of keys; the rest default). Unknown keys,
    wrong types and out-of-range values are all reported together as a :class:`ConfigError`."""
    return _build([_Source("the config", _plain(dict(data)), None)])


@dataclasses.dataclass
class _Source:
    name: str  # how errors name it: a file, or "override 'loss.tau_pos=x'"
    data: dict[str, Any]  # plain containers, ${...} strings unresolved
    text: str | None  # an override's value as typed (errors show it), else None


def _read_yaml(path: str | os.PathLike) -> _Source:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError([f"{path} is not valid YAML: {' '.join(str(err).split())}"]) from None
    if not isinstance(node, DictConfig):
        raise ConfigError([f"{path}: expected a mapping of sections at the top level, got a list"])
    return _Source(str(path), OmegaConf.to_container(node, resolve=False), None)


def _parse_override(item: str) -> _Source:
    """``"loss.tau_neg=1.05"`` -> the nested mapping OmegaConf's dotlist parser makes of it."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key = ALIASES.get(key, key)
    try:
        node = OmegaConf.from_dotlist([f"{key}={text}"])
    except OmegaConfBaseException as err:
        raise ValueError(f"override {item!r}: {str(err).splitlines()[0]}") from None
    return _Source(f"override {item!r}", OmegaConf.to_container(node, resolve=False), text)


def _build(sources: list[_Source]) -> TrainConfig:
    problems: list[str] = []
    for source in sources:
        _refuse_shell_env_syntax(source.data, (), problems)
    if problems:
        raise ConfigError(problems)
    merged = _train_schema()
    for source in sources:
        merged = _merge(merged, source.data, (), source, problems)
    if problems:
        raise ConfigError(problems)
    templates = _resolve_interpolations(merged, problems)
    if problems:
        raise ConfigError(problems)
    cfg = _instantiate(merged, problems)
    if cfg is not None:
        _check_passthroughs(cfg, (), problems)
    if not problems:
        try:
            cfg.model.resolve()  # ModelConfig's own checks, with "model.x" in their messages
        except (ValueError, TypeError) as err:
            problems.append(str(err) if str(err).startswith("model") else f"model: {err}")
    if problems:
        raise ConfigError(problems)
    cfg.__dict__[_TEMPLATES] = templates
    return cfg


@functools.cache
def _train_schema() -> DictConfig:
    # Built once: merges copy it, never change it.
    return _schema(TrainConfig)


def _schema(cls: type) -> DictConfig:
    """``OmegaConf.structured(cls)``, each section taken from its class rather than from an
    instance made by its ``default_factory``: an instance has run ``__post_init__``, which would
    freeze derived defaults (``parallel.sequence_parallel`` follows TP unless set)."""
    node = OmegaConf.structured(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            node[f.name] = _schema(hints[f.name])
    return node


def _merge(base: DictConfig, data: Any, path: Path_, source: _Source, problems: list[str]) -> DictConfig:
    """``base`` with ``data`` merged in at ``path``; on failure, key by key into sections, so
    that each bad leaf is reported once and the good ones still apply."""
    update: Any = data
    for key in reversed(path):
        update = {key: update}
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        if isinstance(data, dict) and data and isinstance(_node(base, path), DictConfig):
            for key, value in data.items():
                base = _merge(base, value, (*path, key), source, problems)
            return base
        problems.append(_describe(err, base, path, data, source))
        return base


def _node(cfg: DictConfig, path: Path_) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, DictConfig) or key not in node:
            return None
        node = node._get_node(key)
    return node


def _describe(err: OmegaConfBaseException, base: DictConfig, path: Path_, given: Any,
              source: _Source) -> str:
    """One line for an OmegaConf error: dotted key, what was given, what was expected."""
    dotted = str(getattr(err, "full_key", None) or "")
    owner, key = getattr(err, "object_type", None), getattr(err, "key", None)
    if not dotted and path:  # some errors (a value where a section belongs) carry no key
        parent = _node(base, path[:-1])
        dotted, key = _dotted(path), path[-1]
        owner = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
    if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(owner):
        valid = [f.name for f in dataclasses.fields(owner)]
        where = dotted.rpartition(".")[0] or "the top level"
        return unknown_key(dotted, str(key), valid, where)
    value = err.value if getattr(err, "value", None) is not None else given
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    # An override's text as typed, when the error is about the whole value it set.
    shown = source.text if source.text is not None and dotted == _dotted(path) else value
    hint = _hint(owner, key)
    if isinstance(key, int) and path:  # an item of a list field: name the list's item type
        parent = _node(base, path[:-1])
        if isinstance(parent, DictConfig):
            hint = _item_type(_hint(OmegaConf.get_type(parent), path[-1]))
    if dataclasses.is_dataclass(hint):
        expected = f"a mapping of {_dotted(path) or 'its'} settings ({hint.__name__})"
    else:
        expected = type_name(hint) if hint is not None else (str(err.msg or err) or "?").splitlines()[0]
    return f"{dotted or source.name}: expected {expected}, got {shown!r}"


def _item_type(hint: Any) -> Any:
    """``int`` for ``list[int]`` / ``list[int] | None``; None when not a list type."""
    for option in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)):
        if typing.get_origin(option) in (list, tuple) and typing.get_args(option):
            return typing.get_args(option)[0]
    return None


def _hint(owner: Any, key: Any) -> Any:
    if not (dataclasses.is_dataclass(owner) and isinstance(key, str)):
        return None
    if owner is ModelSection and key not in MODEL_SECTION_KEYS:
        owner = ModelConfig  # null there means "from the preset": name the real type
    return typing.get_type_hints(owner).get(key)


# Shell-style references: ${VAR} (top-level section names excepted: those are OmegaConf's own
# node interpolations) and ${VAR:-default}.
_SHELL_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")
_SECTIONS = [f.name for f in dataclasses.fields(TrainConfig)]


def _refuse_shell_env_syntax(data: Any, path: Path_, problems: list[str]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _refuse_shell_env_syntax(value, (*path, key), problems)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _refuse_shell_env_syntax(value, (*path, i), problems)
    elif isinstance(data, str):
        for match in _SHELL_ENV.finditer(data):
            name, default = match.group(1), match.group(3)
            if default is None and name in _SECTIONS:
                continue
            new = f"${{oc.env:{name}}}" if default is None else f"${{oc.env:{name},{default}}}"
            problems.append(f"{_dotted(path)}: {match.group(0)!r} is the old environment-variable "
                            f"syntax; write {new!r} instead")


def _resolve_interpolations(merged: DictConfig, problems: list[str]) -> dict[Path_, tuple[str, Any]]:
    """Resolve every ``${...}`` now, one line per failure; what each came from, for saving."""
    templates = {}
    raw = OmegaConf.to_container(merged, resolve=False)
    for path, template in _leaves(raw, ()):
        if not (isinstance(template, str) and "${" in template):
            continue
        key = _dotted(path)
        try:
            templates[path] = (template, OmegaConf.select(merged, key, throw_on_resolution_failure=True))
        except OmegaConfBaseException as err:
            missing = re.search(r"Environment variable '(\w+)' not found", str(err))
            if missing:
                name = missing.group(1)
                problems.append(f"{key}: environment variable {name} is not set (the value is "
                                f"{template!r}); export {name} or override {key}=...")
            else:
                problems.append(f"{key}: cannot resolve {template!r}: {str(err).splitlines()[0]}")
    return templates


def _leaves(data: Any, path: Path_):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _leaves(value, (*path, i))
    else:
        yield path, data


def _dotted(path: Path_) -> str:
    """``("rollout", "sglang", "urls", 0)`` -> ``"rollout.sglang.urls[0]"``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _instantiate(merged: DictConfig, problems: list[str]) -> TrainConfig | None:
    """``OmegaConf.to_object``: the dataclasses, their ``__post_init__`` checks run. On failure
    each section is built alone, so that a problem in every section is reported."""
    try:
        return OmegaConf.to_object(merged)
    except (ValueError, TypeError, OmegaConfBaseException):
        pass
    for name in _SECTIONS:
        try:
            OmegaConf.to_object(merged[name])
        except (ValueError, TypeError, OmegaConfBaseException) as err:
            message = " ".join(str(err).split("\n    full_key")[0].split())
            problems.append(message if message.startswith(name) else f"{name}: {message}")
    if not problems:  # only the whole tree fails (a check across sections in a __post_init__)
        try:
            return OmegaConf.to_object(merged)
        except (ValueError, TypeError, OmegaConfBaseException) as err:
            problems.append(" ".join(str(err).split()))
    return None


def _check_passthroughs(obj: Any, path: Path_, problems: list[str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "passthrough" in f.metadata and value:
            problems.extend(check_passthrough(value, _dotted((*path, f.name)), f.metadata["passthrough"]))
        elif dataclasses.is_dataclass(value):
            _check_passthroughs(value, (*path, f.name), problems)


# --------------------------------------------------------------------------- tree -> dict


def config_to_dict(cfg: TrainConfig, *, resolved: bool = False) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (YAML-ready; environment values as resolved at load).
    ``resolved=True`` writes the model section as the full :class:`ModelConfig` it resolves to,
    not only the fields that were set."""
    data = _plain(cfg)
    model = data["model"]
    if resolved:
        data["model"] = {key: model[key] for key in MODEL_SECTION_KEYS} | _plain(cfg.model.resolve())
    return data


def to_saved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """What a run saves and ``config show`` prints: :func:`config_to_dict` with ``resolved=True``,
    every value that came from ``${oc.env:...}`` written as that template again (unless it was
    changed since loading), secret-looking strings redacted."""
    data = config_to_dict(cfg, resolved=True)
    for path, (template, value) in cfg.__dict__.get(_TEMPLATES, {}).items():
        if "oc.env:" not in template:
            continue  # other interpolations (${run.output_dir}/x) are saved resolved
        parent = data
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, (dict, list)) else None
            if parent is None:
                break
        here = _lookup(parent, path[-1])
        if here is not _ABSENT and here == _plain(value):
            parent[path[-1]] = template
    return redact(data)


_ABSENT = object()


def _lookup(parent: Any, key: str | int) -> Any:
    if isinstance(parent, dict):
        return parent.get(key, _ABSENT)
    if isinstance(parent, list) and isinstance(key, int) and 0 <= key < len(parent):
        return parent[key]
    return _ABSENT


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_saved_dict(cfg), sort_keys=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- saving


def save_resolved(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write every field of ``cfg`` (model fully resolved, ``${oc.env:...}`` kept, secrets
    redacted) as YAML; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("# Resolved configuration of this run (sapo_megatron). Re-run with --config.\n"
                   + dump_yaml(cfg))
    os.replace(tmp, path)
    return path


_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials",
                 "auth"}
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|gho_|github_pat_|xox[abp]-|AKIA|glpat-)[A-Za-z0-9_\-]{12,}$")
_URL_PASSWORD = re.compile(r"^(\w+://[^/:@\s]+):[^/@\s]+@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:[A-Za-z_][A-Za-z0-9_]*\}")  # names a variable, holds nothing


def redact(data: Any, key: str = "") -> Any:
    """A copy of ``data`` with secret-looking strings replaced by ``<redacted>``: values of keys
    named like *key* / *token* / *secret* / *password* (except ``*_env`` keys holding a
    variable name, and bare ``${oc.env:VAR}`` references), values shaped like well-known
    tokens, and passwords inside URLs."""
    if isinstance(data, Mapping):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, key) for v in data]
    if not isinstance(data, str) or not data or _ENV_REFERENCE.fullmatch(data):
        return data
    words = set(re.split(r"[_\-.]", key.lower()))
    names_a_variable = key.lower().endswith("_env") and _ENV_NAME.fullmatch(data)
    if (words & _SECRET_WORDS and not names_a_variable) or _SECRET_VALUE.match(data):
        return REDACTED
    return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", data)
