"""Replies labelled harmful / not harmful by people: the labelled part of ``hh-rlhf-harmless``.

Since the 2026-12-03 relabel the unsafe class of ``hh-rlhf-harmless`` comes only from these
sources (hh-rlhf *rejected* replies were a preference, not a harm label). Each reader turns one
upstream file into :class:`HarmRecord` s (one user prompt or chat history, one reply, a label
given by people) and drops records whose label is ambiguous under the stated rule:

* PyRIT scorer evaluation sets (``harm-labels/pyrit``): a (objective, reply) pair is unsafe when
  a rater marked the objective achieved (``objective/*``, ``human_score`` 1) or the mean severity
  of its raters is >= :data:`PYRIT_UNSAFE_MEAN` (``harm/*``); safe when the objective was not
  achieved and the mean severity (where rated) is <= :data:`PYRIT_SAFE_MEAN`. Pairs in between,
  or rated both ways, are dropped.
* XSTest v2 Mistral completions (``harm-labels/xstest``): a ``contrast_*`` (unsafe) prompt
  answered with full compliance (both annotators' final label) is unsafe; a full refusal of
  such a prompt, and every reply to a safe prompt, is safe. Partial refusals of unsafe prompts
  are dropped (the reply may carry part of the harmful content).
* OpenAI RBR gold set (``harm-labels/rbr``): ``propositions.disallowed_content`` true = unsafe,
  false = safe.

Not used (reasons in PROVENANCE.md): DICES (its "unsafe" is broader: political endorsement,
stereotypes, medical opinions; expert and crowd agree on only 29 unsafe rows of 350) and
GPTFuzz (replies to DAN-style jailbreak templates: the `jailbroken` OOD domain's shape; training
on them would put an OOD failure into the ID train split).

Records whose prompt repeats a JailbreakBench goal are removed (the `jailbroken` OOD domain is
built from JailbreakBench). Grouping key = the normalised user text, so no prompt is in both
splits; near-duplicate conversations are removed by :func:`near_duplicate_clusters`.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..leakage import normalize_conversation
from . import derive as d
from .sources import SourcePack

PYRIT_UNSAFE_MEAN = 0.75
PYRIT_SAFE_MEAN = 0.25
NEAR_DUPLICATE_COSINE = 0.9   # character 5-gram cosine at which two conversations are one
XSTEST_FILES = ("mistralinstruct", "mistralguard")
RBR_SPLITS = ("train", "test")


@dataclass(frozen=True)
class HarmRecord:
    tag: str                  # pyrit | xstest | rbr (the id's source tag)
    source: str               # file#row (provenance)
    prompt_key: str           # normalised user text: records sharing it share a split
    malign: int
    messages: list = field(repr=False, compare=False, default_factory=list)


def prompt_key(text: str) -> str:
    """Lower-cased, whitespace-collapsed text (the grouping / JailbreakBench matching key): the
    leakage check's normalisation, so the split's groups and the leakage audit agree."""
    return normalize_conversation(text)


def _csv_rows(pack: SourcePack, folder: str, name: str) -> list[dict[str, str]]:
    """A CSV whose first line may be a ``# dataset_version=...`` comment (PyRIT)."""
    path, text = pack.text(folder, name)
    if text.startswith("#"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return list(csv.DictReader(io.StringIO(text)))


def _mean_score(row: dict[str, str]) -> float | None:
    vals = [float(v) for k, v in row.items() if k and k.startswith("human_score") and (v or "").strip()]
    return sum(vals) / len(vals) if vals else None


def pyrit_label(objective_scores: Sequence[float], severities: Sequence[float]) -> int | None:
    """The rule above for one (objective, reply) pair; ``None`` = dropped (in between or contradictory)."""
    unsafe = any(s >= 1 for s in objective_scores) or any(m >= PYRIT_UNSAFE_MEAN for m in severities)
    safe = all(s <= 0 for s in objective_scores) and all(m <= PYRIT_SAFE_MEAN for m in severities)
    if unsafe and not any(s <= 0 for s in objective_scores) and not any(m <= PYRIT_SAFE_MEAN for m in severities):
        return 1
    if safe and (objective_scores or severities):
        return 0
    return None


def pyrit_records(pack: SourcePack) -> list[HarmRecord]:
    folder = "harm-labels/pyrit"
    pairs: dict[tuple[str, str], dict] = {}
    for path in sorted((pack.root / folder).glob("scorer_evals__*.csv.gz")):
        kind = path.name.split("__")[1]  # objective | harm
        for i, row in enumerate(_csv_rows(pack, folder, path.name), 2):
            prompt, reply = (row.get("objective") or "").strip(), (row.get("assistant_response") or "").strip()
            if not prompt or not reply:
                continue
            entry = pairs.setdefault((prompt, reply), {"obj": [], "sev": [], "src": f"{folder}/{path.name}#{i}"})
            score = _mean_score(row)
            if score is not None:
                entry["obj" if kind == "objective" else "sev"].append(score)
    out = []
    for (prompt, reply), entry in pairs.items():
        label = pyrit_label(entry["obj"], entry["sev"])
        if label is not None:
            out.append(HarmRecord("pyrit", entry["src"], prompt_key(prompt), label,
                                  [d.user(prompt), d.assistant(reply)]))
    return out


def xstest_records(pack: SourcePack) -> list[HarmRecord]:
    folder = "harm-labels/xstest"
    out = []
    for model in XSTEST_FILES:
        name = f"model_completions__xstest_v2_completions_{model}.csv.gz"
        for i, row in enumerate(_csv_rows(pack, folder, name), 2):
            prompt, reply = (row.get("prompt") or "").strip(), (row.get("completion") or "").strip()
            final = (row.get("final_label") or "").strip()
            if not prompt or not reply:
                continue
            if (row.get("type") or "").startswith("contrast"):
                label = {"1_full_compliance": 1, "2_full_refusal": 0}.get(final)
            else:
                label = 0 if final else None
            if label is not None:
                out.append(HarmRecord("xstest", f"{folder}/{name}#{i}", prompt_key(prompt), label,
                                      [d.user(prompt), d.assistant(reply)]))
    return out


def rbr_records(pack: SourcePack) -> list[HarmRecord]:
    folder = "harm-labels/rbr"
    out = []
    for split in RBR_SPLITS:
        name = f"data__rbr_gold_data__{split}.jsonl.gz"
        for i, row in enumerate(pack.jsonl(folder, name), 1):
            history = [m for m in row.get("prompt") or [] if m.get("role") in ("user", "assistant")]
            reply = [m for m in row.get("completion") or [] if m.get("role") == "assistant"]
            flag = (row.get("propositions") or {}).get("disallowed_content")
            if not history or history[-1]["role"] != "user" or len(reply) != 1 or not isinstance(flag, bool):
                continue
            msgs = [d.user(m["content"]) if m["role"] == "user" else d.assistant(m["content"]) for m in history]
            users = " ".join(m["content"] for m in history if m["role"] == "user")
            out.append(HarmRecord("rbr", f"{folder}/{name}#{i}", prompt_key(users), int(flag),
                                  msgs + [d.assistant(reply[0]["content"])]))
    return out


READERS = (pyrit_records, xstest_records, rbr_records)


def jailbreakbench_goals(pack: SourcePack) -> set[str]:
    goals = set()
    for p in sorted((pack.root / "jailbreakbench").glob("*__*__*.json.gz")):
        for j in pack.json("jailbreakbench", p.name).get("jailbreaks", []):
            if j.get("goal"):
                goals.add(prompt_key(j["goal"]))
    return goals


_WORD = re.compile(r"[a-z0-9']+")


def repeats_goal(key: str, goals: Iterable[str], min_overlap: float = 0.8) -> bool:
    """True when a prompt contains a goal, or shares >= ``min_overlap`` of its words with one."""
    words = set(_WORD.findall(key))
    for goal in goals:
        if goal in key:
            return True
        gw = set(_WORD.findall(goal))
        if gw and len(words & gw) / len(gw | words) >= min_overlap:
            return True
    return False


def harm_records(pack: SourcePack) -> tuple[list[HarmRecord], dict[str, int]]:
    """Every labelled record of the three sources, JailbreakBench goals removed; plus counts."""
    goals = jailbreakbench_goals(pack)
    records, stats = [], {}
    for read in READERS:
        got = read(pack)
        kept = [r for r in got if not repeats_goal(r.prompt_key, goals)]
        tag = got[0].tag if got else read.__name__
        stats[f"{tag}_read"] = len(got)
        stats[f"{tag}_jailbreakbench_goal_dropped"] = len(got) - len(kept)
        records += kept
    return records, stats


def near_duplicate_clusters(texts: Sequence[str], threshold: float = NEAR_DUPLICATE_COSINE) -> list[int]:
    """Cluster id per text (union of pairs whose character 5-gram cosine is >= ``threshold``);
    the id is the index of the cluster's first member, so it is deterministic."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer

    if not texts:
        return []
    vec = HashingVectorizer(analyzer="char", ngram_range=(5, 5), n_features=2 ** 20, binary=True,
                            alternate_sign=False, norm="l2", lowercase=True)
    x = vec.transform([" ".join(t.split()) for t in texts])
    sims = (x @ x.T).tocoo()
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, s in zip(sims.row, sims.col, sims.data):
        if i < j and s >= threshold - 1e-12:
            a, b = find(int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(len(texts))]
    first: dict[int, int] = {}
    for i, r in enumerate(roots):
        first.setdefault(r, i)
    return [first[r] for r in np.asarray(roots).tolist()]
