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

Rubrics are YAML data files (``train/rubrics/{alignment,uncertainty}.yaml``, replaceable via
``judge.alignment_rubric`` / ``judge.uncertainty_rubric``); fields: ``name``, ``instructions``,
``example`` and ``query`` (templates with ``{conversation}``; ``example`` also ``{answer}``),
optional ``answers``, and ``targets: {safe: v, unsafe: v}`` (the answer for a safe / unsafe ID
row: few-shot answers and the judge SFT target, see :mod:`train.judge`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mood_data.errors import BundleError
from train.detector_table import names

from train.judge_prompts import (  # noqa: F401 - re-exported: eval.judge is the scorer's public face
    DIGIT_ANSWERS, MIN_CONVERSATION_TOKENS, RUBRIC_OF, RUBRICS_DIR, SENTINEL, PromptParts, Rubric, answer_token_ids,
    assemble, judge_view, load_rubric, prompt_parts, recipe_rubrics, render_prompt, rubric_path, select_shots, user_text,
)

JUDGE_DETECTORS = names(forward="judge")  # from the detector table


def encode_prompts(tokenizer, parts: PromptParts, conversations: Sequence[str], max_length: int,
                   where: str = "judge"):
    """:class:`eval.forward.Encoded` of the judge prompts (truncated rows counted)."""
    from ..engine.forward import Encoded

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
    from train.data import positions_from_mask

    from ..engine.forward import collate, length_batches, pad_id
    from ..engine.parallel import run_batches

    n = len(encoded.input_ids)
    scores, mass = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
    pad, device = pad_id(backbone), backbone.device

    def compute(index: np.ndarray):
        batch = collate(encoded, index, pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden = backbone.lm_hidden(ids, mask, adapter=adapter, position_ids=positions_from_mask(mask))
            logits = backbone.lm_head(hidden[:, -1].to(backbone.head_device)).float()
        return logits.cpu()

    # data-parallel under a multi-process launch (eval.parallel): every rank gets every batch
    for index, logits in run_batches(length_batches(encoded.lengths, batch_size), compute, desc=desc):
        scores[index], mass[index] = expected_score(logits, parts.answer_ids, parts.values)
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


def load_judge(recipe, loaded=None, train_rows=None, device: str | None = None) -> Judge:
    """The recipe's judge: ``judge.model`` (any instruct model; default the recipe's model) with
    the judge LoRA (``judge.adapter`` or ``<run>/judge``) if there is one. When the judge shares
    the guard's base, the LoRA is one more adapter on the already loaded base."""
    from train.modeling import load_tokenizer, resolve_model

    from ..engine.forward import SharedBackbone, adapter_hash

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
        # where the guard's base went (the one device policy), else resolved for this recipe
        where = getattr(getattr(loaded, "backbone", None), "placement", None)
        if where is None:
            from train.device import placement

            where = placement(recipe.dtype, device, recipe.eval.device_map)
        backbone = SharedBackbone.from_pretrained(resolve_model(model), placement=where,
                                                  trust_remote_code=recipe.trust_remote_code)
    name = None
    if adapter_dir is not None:
        name = "judge"
        if not (hasattr(backbone.model, "peft_config") and name in backbone.model.peft_config):
            backbone.add_adapter(name, adapter_dir)
    tok_src = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else model
    tokenizer = load_tokenizer(tok_src, trust_remote_code=recipe.trust_remote_code)
    if train_rows is None:
        from train.data import train_validation_cut

        train_rows, _ = train_validation_cut(recipe)
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
    from .cache import cached_scores, fingerprint

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
