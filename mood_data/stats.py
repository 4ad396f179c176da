"""Per split x domain statistics of loaded MOOD splits (pure computation; the CLI prints them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .domains import DEFAULT_REGISTRY, DomainRegistry

ALL = "(all)"


@dataclass(frozen=True)
class StatRow:
    """One line of ``moodguard data stats``; token fields are ``None`` without a tokenizer."""

    split: str
    domain: str
    kind: str  # "id" | "ood" | "opt-in" | "all"
    rows: int
    malign_rate: float
    chars_p50: float
    chars_p90: float
    chars_max: int
    tokens_p50: float | None = None
    tokens_p90: float | None = None
    tokens_max: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def length_summary(lengths: Sequence[int] | np.ndarray) -> tuple[float, float, int]:
    """(p50, p90, max) in float64 with numpy's default linear interpolation."""
    arr = np.asarray(lengths, dtype=np.float64)
    p50, p90 = np.percentile(arr, [50, 90])
    return float(p50), float(p90), int(arr.max())


def token_lengths(texts: Sequence[str], tokenizer: Any, batch_size: int = 256) -> np.ndarray:
    """Untruncated token count of each text (no special tokens added)."""
    from tqdm.auto import tqdm

    out = np.zeros(len(texts), dtype=np.int64)
    for start in tqdm(range(0, len(texts), batch_size), desc="tokenize", disable=None, leave=False):
        batch = list(texts[start:start + batch_size])
        ids = tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        out[start:start + len(batch)] = [len(x) for x in ids]
    return out


def _kind(domain: str, registry: DomainRegistry) -> str:
    if registry.is_id(domain):
        return "id"
    if domain in registry.opt_in:
        return "opt-in"
    return "ood" if domain in registry.ood else "unknown"


def _row(split: str, domain: str, kind: str, malign: np.ndarray, chars: np.ndarray, tokens: np.ndarray | None) -> StatRow:
    c50, c90, cmax = length_summary(chars)
    t50 = t90 = tmax = None
    if tokens is not None:
        t50, t90, tmax = length_summary(tokens)
    return StatRow(split, domain, kind, int(malign.size), float(np.mean(malign, dtype=np.float64)),
                   c50, c90, cmax, t50, t90, tmax)


def compute_stats(splits: Mapping[str, Any], *, tokenizer: Any = None,
                  registry: DomainRegistry = DEFAULT_REGISTRY) -> list[StatRow]:
    """Rows per split x domain (registry order, then an ``(all)`` row per split).

    ``splits`` maps split name to a dataset with ``conversation``, ``domain`` and ``malign``.
    """
    out: list[StatRow] = []
    order = {d: i for i, d in enumerate(registry.known)}
    for split, ds in splits.items():
        texts = list(ds["conversation"])
        domains = np.asarray(list(ds["domain"]), dtype=object)
        malign = np.asarray(list(ds["malign"]), dtype=np.int64)
        chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        tokens = token_lengths(texts, tokenizer) if tokenizer is not None else None
        for domain in sorted(set(domains), key=lambda d: (order.get(d, len(order)), d)):
            mask = domains == domain
            out.append(_row(split, domain, _kind(domain, registry), malign[mask], chars[mask],
                            None if tokens is None else tokens[mask]))
        out.append(_row(split, ALL, "all", malign, chars, tokens))
    return out
