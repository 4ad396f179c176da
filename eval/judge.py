"""Instruction-tuned judge: an instruction-following LM prompted with a rubric (and few-shot
examples from the ID train split) reads a conversation and answers a 0-100 score.

Detectors: ``judge`` (the ``alignment`` rubric: is the assistant's behaviour acceptable;
higher = less acceptable) and ``judge-uncertainty`` (the ``uncertainty`` rubric: how unsure is
the judge; higher = less sure). Both: higher = more unsafe / more OOD.

Deterministic, one forward per conversation and rubric: the score is the EXPECTED VALUE of the
next-token distribution at the answer position over a fixed set of single-token answers,
renormalised over that set: ``score = sum_k p_k v_k / sum_k p_k``. The default answer set is
the ten digits ``"0".."9"`` standing for ``v = 100 * d / 9`` (0, 11.1, ..., 100): digits are
single tokens for the tiny BPE, SmolLM2, Llama-3, Qwen2.5 and Gemma-2 tokenizers, while
"10".."100" are not (SmolLM2 splits every digit). A rubric file may declare another set
(``answers: {text: value}``); every answer must be ONE token for the judge's tokenizer.

Prompt (one user turn through the judge tokenizer's chat template + the generation prompt)::

    <rubric instructions>  <few-shot examples: conversation + answer>  <query with the
    conversation>  <answer prompt>   [assistant turn starts: the next token is the answer]

The conversation is shown as plain ``User:`` / ``Assistant:`` text (turn markers of the MOOD
rendering removed). Long conversations are cut from the LEFT inside the conversation slot only:
the prefix (rubric + examples) and the suffix (answer prompt + generation prompt) are never
cut; if they alone do not fit ``judge.max_length`` that is a one-line RecipeError.

Rubrics are YAML data files (``eval/rubrics/{alignment,uncertainty}.yaml``, replaceable via
``judge.alignment_rubric`` / ``judge.uncertainty_rubric``); fields: ``name``, ``instructions``,
``example`` and ``query`` (templates with ``{conversation}``; ``example`` also ``{answer}``),
optional ``answers``, and ``targets: {safe: v, unsafe: v}`` (the answer for a safe / unsafe ID
row: few-shot answers and the judge SFT target, see :mod:`train.judge`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mood_data.errors import BundleError, RecipeError
from mood_data.readers import read_yaml

JUDGE_DETECTORS = ("judge", "judge-uncertainty")
RUBRIC_OF = {"judge": "alignment", "judge-uncertainty": "uncertainty"}
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
    """``None`` -> the packaged ``eval/rubrics/<default>.yaml``; a bare name -> the packaged one."""
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


def recipe_rubrics(recipe, names: Sequence[str] = ("alignment", "uncertainty")) -> dict[str, Rubric]:
    j = recipe.judge
    files = {"alignment": j.alignment_rubric, "uncertainty": j.uncertainty_rubric}
    return {n: load_rubric(files[n], n) for n in names}


# ----------------------------------------------------------------------------- conversations, shots
_TURN = re.compile(r"<start_of_turn>(user|model)\n")


def judge_view(conversation: str) -> str:
    """The MOOD rendering as plain text: ``User: ...`` / ``Assistant: ...`` blocks (the turn
    markers are special tokens of the guard's tokenizer, not of an instruct judge's)."""
    text = _TURN.sub(lambda m: "User: " if m.group(1) == "user" else "Assistant: ", conversation)
    return re.sub(r"\n*<end_of_turn>\n?", "\n", text).strip()


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


def encode_prompts(tokenizer, parts: PromptParts, conversations: Sequence[str], max_length: int,
                   where: str = "judge"):
    """:class:`eval.forward.Encoded` of the judge prompts (truncated rows counted)."""
    from .forward import Encoded

    conv_ids = tokenizer([judge_view(c) for c in conversations], add_special_tokens=False, verbose=False)["input_ids"]
    ids, truncated = [], []
    for i, c in enumerate(conv_ids):
        row, cut = assemble(parts, c, max_length, where)
        ids.append(row)
        if cut:
            truncated.append(i)
    return Encoded(ids, truncated)


# ----------------------------------------------------------------------------- scoring
def expected_score(logits, answer_ids: Sequence[int], values) -> tuple[np.ndarray, np.ndarray]:
    """Expected answer value under the next-token distribution renormalised over the answer
    tokens, and the probability mass the full distribution puts on them (a diagnostic).

    ``logits``: ``[b, vocab]``. Float64 throughout."""
    import torch

    z = torch.as_tensor(logits).double()
    sel = z[:, list(answer_ids)]
    p = torch.softmax(sel, dim=-1)
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    score = p @ v
    mass = torch.exp(torch.logsumexp(sel, -1) - torch.logsumexp(z, -1))
    return score.numpy(), mass.numpy()


def judge_pass(backbone, adapter: str | None, encoded, parts: PromptParts, *, batch_size: int,
               desc: str = "judge forward") -> tuple[np.ndarray, np.ndarray]:
    """One forward per prompt (length-sorted batches, left padding, position ids from the mask
    so a row's answer does not depend on its batch); only the last position goes through
    ``lm_head``. Returns (scores, answer mass) in the original order."""
    import torch
    from tqdm.auto import tqdm

    from train.data import positions_from_mask

    from .forward import collate, length_batches, pad_id

    n = len(encoded.input_ids)
    scores, mass = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
    pad, device = pad_id(backbone), backbone.device
    for index in tqdm(length_batches(encoded.lengths, batch_size), desc=desc, unit="batch", disable=None):
        batch = collate(encoded, index, pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden = backbone.lm_hidden(ids, mask, adapter=adapter, position_ids=positions_from_mask(mask))
            logits = backbone.lm_head(hidden[:, -1]).float()
        scores[index], mass[index] = expected_score(logits.cpu(), parts.answer_ids, parts.values)
    return scores, mass


# ----------------------------------------------------------------------------- the judge of a recipe
@dataclass
class Judge:
    backbone: object  # eval.forward.SharedBackbone
    adapter: str | None  # adapter name on the backbone (None = base weights)
    tokenizer: object
    model: str
    adapter_dir: Path | None
    adapter_hash: str | None
    shots: list[dict]
    max_length: int

    def parts(self, rubric: Rubric) -> PromptParts:
        return prompt_parts(self.tokenizer, rubric, self.shots)

    def score(self, rubric: Rubric, conversations: Sequence[str], batch_size: int, desc: str = "") -> tuple[np.ndarray, np.ndarray, int]:
        parts = self.parts(rubric)
        enc = encode_prompts(self.tokenizer, parts, conversations, self.max_length, f"{rubric.path}")
        s, m = judge_pass(self.backbone, self.adapter, enc, parts, batch_size=batch_size,
                          desc=f"judge ({rubric.name}){desc}")
        return s, m, enc.n_truncated


def judge_adapter_dir(recipe) -> Path | None:
    """``judge.adapter`` if set, else ``<run>/judge`` when it holds an adapter, else None."""
    j = recipe.judge
    d = Path(j.adapter) if j.adapter else Path(recipe.output_dir) / "judge"
    if (d / "adapter_config.json").is_file():
        return d
    if j.adapter:
        raise BundleError(f"{d}: judge adapter not found (key 'judge.adapter')")
    return None


def load_judge(recipe, loaded=None, train_rows=None) -> Judge:
    """The recipe's judge: ``judge.model`` (any instruct model; default the recipe's model) with
    the judge LoRA (``judge.adapter`` or ``<run>/judge``) if there is one. When the judge shares
    the guard's base, the LoRA is one more adapter on the already loaded base."""
    from train.modeling import load_tokenizer, resolve_model

    from .forward import SharedBackbone, adapter_hash

    j = recipe.judge
    model = j.model or recipe.model
    adapter_dir = judge_adapter_dir(recipe)
    if adapter_dir is None and j.model is None:
        raise BundleError(f"{Path(recipe.output_dir) / 'judge'}: no judge adapter and 'judge.model' is not set: train "
                          "one (moodguard train judge --recipe R judge.enabled=true) or set judge.model to an instruct model")
    same_base = loaded is not None and resolve_model(model) == resolve_model(recipe.model)
    if same_base:
        backbone = loaded.backbone
    else:
        dtype = "float32" if recipe.dtype == "auto" else recipe.dtype
        backbone = SharedBackbone.from_pretrained(resolve_model(model), dtype=dtype,
                                                  trust_remote_code=recipe.trust_remote_code)
    name = None
    if adapter_dir is not None:
        name = "judge"
        if not (hasattr(backbone.model, "peft_config") and name in backbone.model.peft_config):
            backbone.add_adapter(name, adapter_dir)
    tok_src = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else model
    tokenizer = load_tokenizer(tok_src, trust_remote_code=recipe.trust_remote_code)
    if train_rows is None:
        from .monitor import load_train_slices

        train_rows, _ = load_train_slices(recipe)
    shots = select_shots(train_rows, j.n_shots, seed=j.shot_seed, max_chars=j.shot_max_chars)
    return Judge(backbone, name, tokenizer, str(model), adapter_dir,
                 None if adapter_dir is None else adapter_hash(adapter_dir), shots, j.max_length)


def judge_scores(judge: Judge, rubrics: Mapping[str, Rubric], wanted: Sequence[str], conversations: Sequence[str],
                 batch_size: int, desc: str = "") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``{detector: scores}`` for the wanted judge detectors and per-detector diagnostics
    (mean answer-token mass, truncated rows)."""
    out, info = {}, {}
    for det in wanted:
        s, m, n_trunc = judge.score(rubrics[RUBRIC_OF[det]], conversations, batch_size, desc)
        out[det] = s
        info[f"{det}_answer_mass"] = float(np.mean(m)) if len(m) else float("nan")
        info[f"{det}_truncated_rows"] = n_trunc
    return out, info


def calibration(recipe, judge: Judge, rubrics: Mapping[str, Rubric], wanted: Sequence[str], val_rows) -> dict[str, np.ndarray]:
    """The wanted judge detectors' scores on the ID validation slice (cached per judge model,
    adapter, rubric, shots and slice)."""
    from .monitor import cached_scores, fingerprint

    calib = {}
    for det in wanted:
        rub = rubrics[RUBRIC_OF[det]]
        parts = {"detector": det, "model": judge.model, "adapter": judge.adapter_hash, "rubric": rub.sha256,
                 "shots": [s["id"] for s in judge.shots], "max_length": judge.max_length,
                 "data": fingerprint(val_rows["id"], val_rows["conversation"])}
        calib.update(cached_scores(recipe, "judge", parts, lambda det=det: judge_scores(
            judge, rubrics, [det], list(val_rows["conversation"]), recipe.eval.batch_size, " (ID validation)")[0]))
    return calib


def score_for_eval(recipe, loaded, wanted: Sequence[str], conversations: Sequence[str] | None, train_rows,
                   val_rows) -> dict:
    """Cached ID-validation scores of the wanted judge detectors, the loaded judge and its
    rubrics, and (unless ``conversations`` is None) their test scores (see
    :func:`eval.monitor.extra_detector_scores`). Shots come from ``train_rows`` (train slice)."""
    import time

    judge = load_judge(recipe, loaded, train_rows)
    rubrics = recipe_rubrics(recipe, sorted({RUBRIC_OF[d] for d in wanted}))
    out = {"group": "judge", "calibration": calibration(recipe, judge, rubrics, wanted, val_rows),
           "judge": judge, "rubrics": rubrics}
    if conversations is not None:
        t0 = time.perf_counter()
        out["test"], out["info"] = judge_scores(judge, rubrics, wanted, conversations, recipe.eval.batch_size, " (test)")
        out["seconds"] = time.perf_counter() - t0
    return out


__all__ = [
    "DIGIT_ANSWERS", "JUDGE_DETECTORS", "Judge", "PromptParts", "RUBRIC_OF", "Rubric", "answer_token_ids", "assemble",
    "calibration",
    "encode_prompts", "expected_score", "judge_adapter_dir", "judge_pass", "judge_scores", "judge_view", "load_judge",
    "load_rubric", "prompt_parts", "recipe_rubrics", "render_prompt", "score_for_eval", "select_shots", "user_text",
]
