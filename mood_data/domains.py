"""The MOOD domain registry: which domains are in-distribution (ID) and which are OOD.

The defaults follow mood-bench 1.0.0. Users (an org refreshing its monitor on new data) may
declare extra domains in a small YAML file::

    id: [my-support-chats]          # added to the ID domains (allowed in train)
    ood: [my-new-failure-mode]      # added to the OOD domains (test only)
    opt_in: []                      # known, but evaluated only when asked for
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .readers import read_yaml, short_repr

# a domain name: letters, digits, '.', '_', '-', starting with a letter or digit, at most 64
# characters. Names become report rows and (through file_slug) file names: never '..', '/',
# '\\', an absolute path, a space or a control character
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DOMAIN_NAME_RULE = "letters, digits, '.', '_', '-', starting with a letter or digit, at most 64 characters"

ID_DOMAINS: tuple[str, ...] = ("hh-rlhf-helpful", "hh-rlhf-harmless", "function-calling")
OOD_DOMAINS: tuple[str, ...] = (
    "controlling",
    "insecure-code",
    "scheming",
    "jailbroken",
    "sycophantic",
    "function-calling-missing",
    "function-calling-inappropriate",
)
OPT_IN_DOMAINS: tuple[str, ...] = ("swahili",)


def domain_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a domain name (None when it can)."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not DOMAIN_NAME.fullmatch(name):
        return f"domain {short_repr(name)} is not a safe name ({DOMAIN_NAME_RULE})"
    return None


def check_domain_name(name: Any, where: str) -> str:
    """``name`` if it is a safe domain name, else a one-line DataError prefixed by ``where``."""
    problem = domain_name_problem(name)
    if problem:
        raise DataError(f"{where}: {problem}")
    return name


def file_slug(name: str) -> str:
    """A file-name stem for ``name`` (a domain or analysis group): a sanitised slug plus a short
    hash of the exact name, so that no name, however written, reaches the file system raw, and
    two names differing only in case or in refused characters never share a file."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", str(name).lower()).strip(".-")[:40] or "group"
    return f"{slug}-{hashlib.sha256(str(name).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


@dataclass(frozen=True)
class DomainRegistry:
    id: tuple[str, ...] = ID_DOMAINS
    ood: tuple[str, ...] = OOD_DOMAINS
    opt_in: tuple[str, ...] = OPT_IN_DOMAINS
    source: str = "built-in"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):  # however a registry is built, its names are safe
        for key in ("id", "ood", "opt_in"):
            for name in getattr(self, key):
                check_domain_name(name, f"{self.source}: key '{key}'")

    @property
    def known(self) -> tuple[str, ...]:
        return self.id + self.ood + self.opt_in

    def is_id(self, domain: str) -> bool:
        return domain in self.id

    def is_ood(self, domain: str) -> bool:
        return domain in self.ood or domain in self.opt_in

    def eval_ood(self, include_opt_in: bool | list[str] = False) -> tuple[str, ...]:
        """OOD domains that count in the 'overall' mean (opt-in ones only when asked)."""
        if include_opt_in is True:
            return self.ood + self.opt_in
        if include_opt_in:
            return self.ood + tuple(d for d in self.opt_in if d in include_opt_in)
        return self.ood


DEFAULT_REGISTRY = DomainRegistry()


def load_registry(path: str | Path | None = None) -> DomainRegistry:
    """The built-in registry, extended by the user's domains YAML when ``path`` is given."""
    if path is None:
        return DEFAULT_REGISTRY
    path = Path(path)
    doc = read_yaml(path, DataError, what="domains file") or {}
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with keys id/ood/opt_in")
    allowed = {"id", "ood", "opt_in"}
    for key in doc:
        if key not in allowed:
            raise DataError(f"{path}: unknown key '{key}' (allowed: id, ood, opt_in)")
    lists = {}
    for key in allowed:
        value = doc.get(key, []) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DataError(f"{path}: key '{key}' must be a list of domain names")
        for name in value:
            check_domain_name(name, f"{path}: key '{key}'")
        lists[key] = tuple(value)
    seen = set(DEFAULT_REGISTRY.known)
    for key in ("id", "ood", "opt_in"):
        for name in lists[key]:
            if name in seen:
                raise DataError(f"{path}: key '{key}': domain '{name}' is declared twice")
            seen.add(name)
    return DomainRegistry(
        id=ID_DOMAINS + lists["id"],
        ood=OOD_DOMAINS + lists["ood"],
        opt_in=OPT_IN_DOMAINS + lists["opt_in"],
        source=str(path),
    )


def registry_override(path: str | None) -> list[str]:
    """``--domains FILE`` as the recipe override it means (``data.registry=FILE``): the same
    registry for every command that reads data. Checked here so a typo fails before any work."""
    if path is None:
        return []
    from pathlib import Path

    load_registry(path)  # one-line DataError on a missing or malformed file
    return [f"data.registry={Path(path).resolve()}"]
