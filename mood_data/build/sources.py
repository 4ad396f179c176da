"""Readers for the raw source pack (``../shared/data/sources``) and the per-source licence table.

Only ``moodguard data build`` reads the pack; the shipped benchmark never needs it at runtime.
Every reader raises :class:`mood_data.errors.DataError` with a one-line message naming the file
(and row) when a file is missing or malformed.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError


@dataclass(frozen=True)
class Source:
    """One upstream source: its folder in the pack, licence and licence file(s)."""

    tag: str
    folder: str
    upstream: str
    commit: str
    license: str
    license_files: tuple[str, ...]


SOURCES: dict[str, Source] = {s.tag: s for s in (
    Source("hh", "hh-rlhf", "github.com/anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d",
           "MIT", ("LICENSE",)),
    Source("bfcl", "bfcl", "PyPI bfcl-eval 2026.3.23 (gorilla BFCL v4 data)",
           "wheel sha256 3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a",
           "Apache-2.0", ("wheel_METADATA.txt",)),
    Source("tau", "tau-bench", "github.com/sierra-research/tau-bench", "59a200c6d575d595120f1cb70fea53cef0632f6b",
           "MIT", ("LICENSE",)),
    Source("jbb", "jailbreakbench", "github.com/JailbreakBench/artifacts", "909e68c01d94222b8ad2e397a017e2e12e2adb73",
           "MIT", ("LICENSE",)),
    Source("sven", "sven", "github.com/eth-sri/sven", "e8449a0d54a5ae0bbdc6bb236330b8c7ec71df57",
           "MIT (code rows: their own project licences, see commit_link)", ("LICENSE",)),
    Source("cse", "cyberseceval", "github.com/meta-llama/PurpleLlama (CybersecurityBenchmarks)",
           "4be64c3a24442b51c76175e6ec67722cc3f5fe38", "MIT (origin_code: from public repos, see repo field)",
           ("LICENSE",)),
    Source("caa", "caa", "github.com/nikitachaudharicodes/psa_private_steering_for_llm_alignment (copy of nrimsky/CAA)",
           "a6f536efc7601877f217dc583d72d1b62b53e9ed", "Apache-2.0 (upstream nrimsky/CAA MIT; items partly CC-BY-4.0 anthropics/evals)",
           ("LICENSE.apache-2.0.psa-repo",)),
    Source("evals", "anthropic-evals", "github.com/anthropics/evals", "84fcc677e52e1902d696c32cd1a6b663e70d3993",
           "CC-BY-4.0 (Perez et al. 2022, Discovering Language Model Behaviors with Model-Written Evaluations)",
           ("LICENSE",)),
    Source("mj", "multijail", "github.com/DAMO-NLP-SG/multilingual-safety-for-LLMs",
           "577ac511437e07a256130945ef312a99158a18ad", "MIT", ("LICENSE",)),
    Source("pyrit", "harm-labels/pyrit", "PyPI pyrit 1.1.0 (pyrit/datasets/scorer_evals)",
           "wheel sha256 84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", "MIT", ("LICENSE",)),
    Source("xstest", "harm-labels/xstest", "github.com/paul-rottger/exaggerated-safety",
           "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
           "prompts CC-BY-4.0; completions of Mistral-7B-Instruct (Apache-2.0 model)", ("LICENSE",)),
    Source("rbr", "harm-labels/rbr", "github.com/openai/safety-rbr-code-and-data (data/rbr_gold_data)",
           "7f489fa6b38d72468235f275c23bf3f0c849e5ca", "MIT", ("LICENSE",)),
)}


class SourcePack:
    """Read-only access to the raw source pack folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: source pack folder not found (pass --sources DIR)")

    def path(self, folder: str, name: str) -> Path:
        p = self.root / folder / name
        if not p.is_file():
            raise DataError(f"{p}: source file not found")
        return p

    def text(self, folder: str, name: str) -> tuple[Path, str]:
        """The decoded text of one gzip file of the pack (and its path)."""
        p = self.path(folder, name)
        try:
            with gzip.open(p, "rb") as fh:
                return p, fh.read().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: cannot read gzip text ({exc})") from None

    def jsonl(self, folder: str, name: str) -> list[dict[str, Any]]:
        p, text = self.text(folder, name)
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: row {i}: not valid JSON ({exc.msg})") from None
        return rows

    def json(self, folder: str, name: str) -> Any:
        p, text = self.text(folder, name)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None

    def csv(self, folder: str, name: str) -> list[dict[str, str]]:
        _, text = self.text(folder, name)
        return list(csv.DictReader(io.StringIO(text)))

    def license_text(self, source: Source) -> str:
        parts = []
        for name in source.license_files:
            parts.append(self.path(source.folder, name).read_text(encoding="utf-8"))
        return "\n\n".join(parts)
