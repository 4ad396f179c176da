"""Judge prompts and rubrics: what the judge trainer (:mod:`train.judge`) and the judge scorer
(:mod:`eval.engine.judge_pass`) must build identically, so it lives here where both import it downward.

Rubrics are YAML data files (``train/rubrics/{alignment,uncertainty}.yaml``, replaceable via
``judge.alignment_rubric`` / ``judge.uncertainty_rubric``); see :mod:`eval.engine.judge_pass` for the
prompt layout and the scoring rule.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mood_data.errors import RecipeError
from mood_data.readers import read_yaml
from mood_data.render import TURN_END, TURN_START

RUBRICS_DIR = Path(__file__).resolve().parent / "rubrics"
SENTINEL = "\u0000MOODGUARD_CONVERSATION\u0000"
DIGIT_ANSWERS: dict[str, float] = {str(d): 100.0 * d / 9.0 for d in range(10)}
MIN_CONVERSATION_TOKENS = 8


# ----------------------------------------------------------------------------- rubrics
@dataclass(frozen=True)
class Rubric:
    name: str
    instructions: str
    example: str
    query: str
    answers: dict[str, float] = field(default_factory=lambda: dict(DIGIT_ANSWERS))
    targets: dict[str, float] = field(default_factory=lambda: {"safe": 0.0, "unsafe": 100.0})
    path: str = ""
    answer_prefix: str = ""  # pre-filled start of the assistant turn, e.g. "Rating: "

    def answer_for(self, malign: int) -> str:
        """The answer text whose value is nearest the rubric's target for this label."""
        target = self.targets["unsafe" if int(malign) else "safe"]
        return min(self.answers, key=lambda a: (abs(self.answers[a] - target), self.answers[a]))

    @property
    def sha256(self) -> str:
        blob = repr((self.name, self.instructions, self.example, self.query, sorted(self.answers.items()),
                     sorted(self.targets.items()), self.answer_prefix))
        return hashlib.sha256(blob.encode()).hexdigest()


def rubric_path(name_or_path: str | Path | None, default: str) -> Path:
    """``None`` -> the packaged ``train/rubrics/<default>.yaml``; a bare name -> the packaged one."""
    if name_or_path is None:
        return RUBRICS_DIR / f"{default}.yaml"
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        return RUBRICS_DIR / f"{p.name}.yaml"
    return p


def load_rubric(name_or_path: str | Path | None = None, default: str = "alignment") -> Rubric:
    """Read and check a rubric YAML; problems are one-line RecipeErrors naming file and field."""
    path = rubric_path(name_or_path, default)
    doc = read_yaml(path, RecipeError, what="rubric file")
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: expected a mapping with fields name, instructions, example, query")
    allowed = {"name", "description", "instructions", "example", "query", "answers", "targets", "answer_prefix"}
    for key in doc:
        if key not in allowed:
            raise RecipeError(f"{path}: field '{key}': unknown field (allowed: {', '.join(sorted(allowed))})")
    for key in ("name", "instructions", "example", "query"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            raise RecipeError(f"{path}: field '{key}': expected a non-empty string")
    if doc["query"].count("{conversation}") != 1:
        raise RecipeError(f"{path}: field 'query': must contain '{{conversation}}' exactly once")
    if "{conversation}" not in doc["example"] or "{answer}" not in doc["example"]:
        raise RecipeError(f"{path}: field 'example': must contain '{{conversation}}' and '{{answer}}'")
    answers = doc.get("answers", DIGIT_ANSWERS)
    if not isinstance(answers, dict) or len(answers) < 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in answers.values()):
        raise RecipeError(f"{path}: field 'answers': expected a mapping of >= 2 answer texts to numbers")
    targets = doc.get("targets", {"safe": 0, "unsafe": 100})
    if not isinstance(targets, dict) or set(targets) != {"safe", "unsafe"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in targets.values()):
        raise RecipeError(f"{path}: field 'targets': expected {{safe: number, unsafe: number}}")
    return Rubric(doc["name"], doc["instructions"].strip(), doc["example"].strip(), doc["query"].strip(),
                  {str(k): float(v) for k, v in answers.items()}, {k: float(v) for k, v in targets.items()}, str(path),
                  str(doc.get("answer_prefix") or ""))


def load_rubrics(alignment: str | Path | None, uncertainty: str | Path | None,
                 names: Sequence[str] = ("alignment", "uncertainty")) -> dict[str, Rubric]:
    """The rubrics ``names`` from the judge section's files (``judge.alignment_rubric`` /
    ``judge.uncertainty_rubric``; None = the packaged one)."""
    files = {"alignment": alignment, "uncertainty": uncertainty}
    return {n: load_rubric(files[n], n) for n in names}


# ----------------------------------------------------------------------------- conversations, shots
_TURN = re.compile(f"{re.escape(TURN_START)}(user|model)\n")


def judge_view(conversation: str) -> str:
    """The MOOD rendering as plain text: ``User: ...`` / ``Assistant: ...`` blocks (the turn
    markers are special tokens of the guard's tokenizer, not of an instruct judge's)."""
    text = _TURN.sub(lambda m: "User: " if m.group(1) == "user" else "Assistant: ", conversation)
    return re.sub(f"\n*{re.escape(TURN_END)}\n?", "\n", text).strip()


def _column(rows, name: str) -> list:
    return list(rows[name]) if not isinstance(rows, list) else [r[name] for r in rows]


def select_shots(rows, n: int, *, seed: int = 0, max_chars: int = 800, registry=None) -> list[dict]:
    """``n`` few-shot examples from ``rows`` (the ID **train** slice; never test rows): ID domains
    only, alternating safe / unsafe (safe first), seeded; among rows whose judge view is at most
    ``max_chars`` characters (the shortest rows if too few are that short)."""
    from mood_data.domains import DEFAULT_REGISTRY

    registry = registry or DEFAULT_REGISTRY
    if n <= 0:
        return []
    ids, convs = _column(rows, "id"), _column(rows, "conversation")
    doms, mal = _column(rows, "domain"), [int(m) for m in _column(rows, "malign")]
    rng = np.random.default_rng(seed)
    pools = {}
    for label in (0, 1):
        idx = [i for i in range(len(ids)) if mal[i] == label and registry.is_id(doms[i])]
        short = [i for i in idx if len(judge_view(convs[i])) <= max_chars]
        if len(short) < (n + 1) // 2:
            short = sorted(idx, key=lambda i: len(convs[i]))[: max(n, len(short))]
        pools[label] = [short[j] for j in rng.permutation(len(short))]
    out, taken = [], {0: 0, 1: 0}
    for k in range(n):
        label = k % 2 if pools[1] else 0
        if taken[label] >= len(pools[label]):
            label = 1 - label
            if taken[label] >= len(pools[label]):
                break
        i = pools[label][taken[label]]
        taken[label] += 1
        out.append({"id": ids[i], "conversation": convs[i], "domain": doms[i], "malign": mal[i]})
    return out


# ----------------------------------------------------------------------------- prompts
def user_text(rubric: Rubric, shots: Sequence[Mapping], conversation: str = SENTINEL) -> str:
    parts = [rubric.instructions]
    if shots:
        ex = [rubric.example.replace("{conversation}", judge_view(s["conversation"]))
              .replace("{answer}", rubric.answer_for(s["malign"])) for s in shots]
        parts.append("Examples:\n\n" + "\n\n".join(ex))
        parts.append("Now rate this conversation.")
    parts.append(rubric.query.replace("{conversation}", conversation))
    return "\n\n".join(parts)


def render_prompt(tokenizer, text: str) -> str:
    """One user turn + the generation prompt: the tokenizer's chat template, else the MOOD one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    from mood_data.render import render

    return render([{"role": "user", "content": text}]) + "\n<start_of_turn>model\n"


@dataclass(frozen=True)
class PromptParts:
    """Token ids around the conversation slot (never truncated) and the answer tokens."""

    prefix: list[int]
    suffix: list[int]
    answer_ids: list[int]
    values: np.ndarray  # float64, same order as answer_ids


def answer_token_ids(tokenizer, rubric: Rubric) -> list[int]:
    ids = []
    for text in rubric.answers:
        tok = tokenizer.encode(text, add_special_tokens=False)
        if len(tok) != 1:
            raise RecipeError(f"{rubric.path}: field 'answers': answer {text!r} is {len(tok)} tokens for this "
                              "tokenizer; every answer must be a single token")
        ids.append(tok[0])
    if len(set(ids)) != len(ids):
        raise RecipeError(f"{rubric.path}: field 'answers': two answers map to the same token")
    return ids


def prompt_parts(tokenizer, rubric: Rubric, shots: Sequence[Mapping] = ()) -> PromptParts:
    rendered = render_prompt(tokenizer, user_text(rubric, shots)) + rubric.answer_prefix
    if rendered.count(SENTINEL) != 1:
        raise RecipeError(f"{rubric.path}: the chat template dropped or repeated the conversation slot")
    pre, suf = rendered.split(SENTINEL)
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and pre.startswith(bos))
    prefix = tokenizer.encode(pre, add_special_tokens=add_special)
    suffix = tokenizer.encode(suf, add_special_tokens=False) if suf else []
    return PromptParts(prefix, suffix, answer_token_ids(tokenizer, rubric),
                       np.array(list(rubric.answers.values()), dtype=np.float64))


def assemble(parts: PromptParts, conversation_ids: Sequence[int], max_length: int, where: str = "judge") -> tuple[list[int], bool]:
    """``prefix + conversation[-room:] + suffix``; returns (ids, truncated)."""
    room = max_length - len(parts.prefix) - len(parts.suffix)
    if room < MIN_CONVERSATION_TOKENS:
        raise RecipeError(f"{where}: key 'judge.max_length': {max_length} leaves {room} tokens for the conversation "
                          f"(rubric + examples {len(parts.prefix)}, answer prompt {len(parts.suffix)}); "
                          "raise it or lower judge.n_shots")
    conv = list(conversation_ids)
    cut = len(conv) > room
    return list(parts.prefix) + (conv[-room:] if cut else conv) + list(parts.suffix), cut

