"""Judge SFT: instruction-tune a base backbone into a rubric judge with a causal-LM LoRA (the
reference used an SFT LoRA on the base model when no instruct variant exists).

Training rows are built from the ID **train** slice only: for every row and every rubric in
``judge.train_rubrics`` the exact prompt that :mod:`eval.engine.judge_pass` scores (rubric + few-shot
examples + conversation cut from the left + answer prompt + generation prompt), followed by ONE
answer token: the rubric's ``targets`` value for the row's label mapped to the nearest answer
(alignment: safe -> "0", unsafe -> "9"; uncertainty: "0"). The loss is on that token only.
The few-shot rows themselves are left out of the training prompts.

    moodguard train judge --recipe R judge.enabled=true [key=value ...]
    python -m train.judge --recipe R [--resume] [key=value ...]

Output: ``<run>/judge/`` (adapter, tokenizer, metrics.json), found by ``eval.run.judge.load_judge``.
``judge.model`` (default: the recipe's model) is the base that is tuned.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from .entry import module_main
from .loop import AdapterJob, train_adapter
from .lm import build_lm_model
from .recipe_schema import Recipe


def judge_recipe(recipe: Recipe) -> Recipe:
    """The recipe seen by the training loop: its model is the judge's base."""
    if recipe.judge.model is None or recipe.judge.model == recipe.model:
        return recipe
    return dataclasses.replace(recipe, model=recipe.judge.model, tokenizer=None)


def build_judge_model(recipe: Recipe, tokenizer):
    return build_lm_model(recipe, tokenizer, section="judge")


def sft_rows(rows, tokenizer, rubrics, shots, max_length: int, where: str = "judge") -> dict[str, list]:
    """input_ids / attention_mask / labels (-100 except the answer) / length for every
    (row, rubric); the prompt leaves one position for the answer token."""
    from .judge_prompts import answer_token_ids, assemble, judge_view, prompt_parts

    shot_ids = {s["id"] for s in shots}
    keep = [i for i, x in enumerate(rows["id"]) if x not in shot_ids]
    convs = [rows["conversation"][i] for i in keep]
    labels = [int(rows["malign"][i]) for i in keep]
    conv_ids = tokenizer([judge_view(c) for c in convs], add_special_tokens=False, verbose=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
    for rubric in rubrics:
        parts = prompt_parts(tokenizer, rubric, shots)
        answer = dict(zip(rubric.answers, answer_token_ids(tokenizer, rubric)))
        for ids, y in zip(conv_ids, labels):
            prompt, _ = assemble(parts, ids, max_length - 1, where)
            target = answer[rubric.answer_for(y)]
            out["input_ids"].append(prompt + [target])
            out["attention_mask"].append([1] * (len(prompt) + 1))
            out["labels"].append([-100] * len(prompt) + [target])
            out["length"].append(len(prompt) + 1)
    return out


def build_judge_datasets(recipe: Recipe, tokenizer):
    import datasets

    from .data import train_validation_cut
    from .judge_prompts import load_rubrics, select_shots

    train, validation = train_validation_cut(recipe)
    split = {"train": train, "validation": validation}
    j = recipe.judge
    shots = select_shots(split["train"], j.n_shots, seed=j.shot_seed, max_chars=j.shot_max_chars)
    rubrics = list(load_rubrics(j.alignment_rubric, j.uncertainty_rubric, j.train_rubrics).values())
    where = str(recipe.source_file or "recipe")
    return datasets.DatasetDict({k: datasets.Dataset.from_dict(sft_rows(v, tokenizer, rubrics, shots, j.max_length, where))
                                 for k, v in split.items()})


def judge_collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForSeq2Seq

    from .data import WithPositions

    return WithPositions(DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=recipe.judge.pad_to_multiple_of,
                                                label_pad_token_id=-100))


JUDGE_JOB = AdapterJob("judge", build_judge_model, build_judge_datasets, judge_collator, None, None)


def train_judge(recipe: Recipe, resume: bool = False, only_seeds: Sequence[int] | None = None) -> Path:
    """Train the judge LoRA(s); returns ``<output_dir>/judge``. The run's ``recipe.yaml`` keeps
    the recipe's own model when ``judge.model`` names another base."""
    from mood_data.atomic import write_text

    tuned = judge_recipe(recipe)
    out = train_adapter(tuned, JUDGE_JOB, resume, only_seeds)[0]
    if tuned is not recipe:
        write_text(Path(recipe.output_dir) / "recipe.yaml", recipe.to_yaml())
    return out


def main(argv=None) -> int:
    return module_main("judge", train_judge, argv)


if __name__ == "__main__":
    sys.exit(main())
