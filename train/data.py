"""Training data: the ID-only train split, its held-out validation slice, tokenisation,
dynamic-padding collators and a seeded length-grouped sampler.

The sampler groups by *global* batch (``global_batch_size`` consecutive indices have similar
lengths) and depends only on ``(seed, epoch)``, never on the number of processes: a 1-process
run with accumulation and an N-process run see exactly the same global batches, and a resumed
run replays the same order.
"""
from __future__ import annotations

import typing
from typing import Iterable, Sequence

import torch
from torch.utils.data import Sampler

from mood_data.errors import DataError
from mood_data.leakage import normalize_conversation
from mood_data.render import turn_regex

from .recipe_schema import DataSection


def load_train_split(source: str | None, template: str = "mood", registry: str | None = None):
    """The restricted (ID-only) train split as a ``datasets.Dataset`` (id, conversation,
    domain, malign), read by ``mood_data.load.load_splits``. When the source has a test split it
    is loaded too: load_splits then refuses a source whose test rows leak from train BEFORE
    anything is trained on it (not only later, in evaluate)."""
    from mood_data.load import load_splits
    from mood_data.sources import has_local_test_split

    splits = ("train", "test") if has_local_test_split(source) else ("train",)
    kwargs = {"splits": splits, "template": template}
    if registry is not None:
        from mood_data.domains import load_registry

        kwargs["registry"] = load_registry(registry)
    return load_splits(source, **kwargs)["train"]


USER_TURN = turn_regex("user")
VALIDATION_GROUPS = typing.get_args(typing.get_type_hints(DataSection)["validation_groups"])  # the schema's table


def prompt_group(conversation: str) -> str:
    """What a prompt-grouped cut keeps together: the first user turn of a MOOD-rendered
    conversation (``<start_of_turn>user``), lower-cased and whitespace-collapsed, so every reply
    to one request (a harmful and a refusing reply, a function call and its corrupted twin)
    lands on the same side. A conversation without that marker (another chat template) is
    its own group."""
    m = USER_TURN.search(conversation)
    return normalize_conversation(m.group("text") if m else conversation)


def _held_out(cells: dict[tuple, list], fraction: float, g: torch.Generator) -> list:
    """``fraction`` of the members of every cell (cells in sorted order, members seeded-permuted),
    at least one of a cell with two or more and never all of it."""
    out: list = []
    for key in sorted(cells):
        members = cells[key]
        perm = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        n_val = int(round(len(members) * fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        out += perm[:n_val]
    return out


def _held_out_rows(ds, fraction: float, g: torch.Generator) -> list[int]:
    """Row-level cut: :func:`_held_out` over the (domain, malign) cells of rows."""
    cells: dict[tuple, list[int]] = {}
    for i, (dom, mal) in enumerate(zip(ds["domain"], ds["malign"])):
        cells.setdefault((dom, int(mal)), []).append(i)
    return _held_out(cells, fraction, g)


def _held_out_groups(ds, fraction: float, g: torch.Generator) -> list[int]:
    """Prompt-grouped cut: groups (:func:`prompt_group`) are stratified by (domain of their first
    row, labels they hold: 0, 1 or both); :func:`_held_out` picks whole groups."""
    groups: dict[str, list[int]] = {}
    for i, conv in enumerate(ds["conversation"]):
        groups.setdefault(prompt_group(conv), []).append(i)
    domains, malign = ds["domain"], ds["malign"]
    cells: dict[tuple, list[str]] = {}
    for key, rows in groups.items():  # dict order = first appearance: deterministic
        labels = sorted({int(malign[i]) for i in rows})
        cells.setdefault((domains[rows[0]], tuple(labels)), []).append(key)
    return [i for key in _held_out(cells, fraction, g) for i in groups[key]]


def train_validation_split(ds, fraction: float, seed: int = 0, max_rows: int | None = None, groups: str = "row"):
    """Deterministic held-out validation slice of the train split, stratified by
    (domain, malign) so both classes of every ID domain are represented. ``groups="prompt"``
    holds out whole prompt groups (:func:`prompt_group`): no request is on both sides, as in
    the benchmark's own train / test split."""
    import datasets

    if groups not in VALIDATION_GROUPS:
        raise DataError(f"data.validation_groups: {groups!r} is not one of {', '.join(VALIDATION_GROUPS)}")
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.shuffle(seed=seed).select(range(max_rows))
    g = torch.Generator().manual_seed(seed)
    val_idx = (_held_out_groups if groups == "prompt" else _held_out_rows)(ds, fraction, g)
    held = set(val_idx)
    train_idx = [i for i in range(len(ds)) if i not in held]
    if not train_idx or not val_idx:
        raise DataError(f"train split: {len(ds)} rows are too few for a validation fraction of {fraction}")
    return datasets.DatasetDict(train=ds.select(sorted(train_idx)), validation=ds.select(sorted(val_idx)))


def validation_cut(source: str | None, *, template: str = "mood", registry: str | None = None,
                   fraction: float = 0.1, max_rows: int | None = None, train_split=None, groups: str = "row"):
    """THE seeded train / validation cut of a source's ID train split: ``(train, validation)``
    (``datasets.Dataset`` each; seed 0). Guard, LM and judge training, fitting, evaluate and
    export all use this one function; a process computes it once and passes it along.
    ``train_split``: the already loaded train split of that source (a caller that loads the test
    split anyway loads both in one ``load_splits`` call instead of reading test twice)."""
    raw = train_split if train_split is not None else load_train_split(source, template, registry)
    parts = train_validation_split(raw, fraction, seed=0, max_rows=max_rows, groups=groups)
    return parts["train"], parts["validation"]


def train_validation_cut(recipe, source: str | None = None, train_split=None):
    """:func:`validation_cut` of a recipe's data section (``data.validation_fraction``,
    ``data.max_train_rows``, ``data.validation_groups``); ``source`` overrides ``data.source``."""
    d = recipe.data
    return validation_cut(source or d.source, template=d.template, registry=d.registry,
                          fraction=d.validation_fraction, max_rows=d.max_train_rows, train_split=train_split,
                          groups=d.validation_groups)


def tokenize_guard(ds, tokenizer, max_length: int):
    """input_ids / attention_mask / labels (1 = unsafe) / length; left truncation keeps the
    end of each conversation."""
    def fn(batch):
        enc = tokenizer(batch["conversation"], truncation=True, max_length=max_length)
        enc["labels"] = [int(m) for m in batch["malign"]]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenize guard")


def tokenize_lm(ds, tokenizer, max_length: int):
    """Only ID-SAFE conversations (the perplexity reference); labels are built by the collator."""
    safe = ds.filter(lambda b: [int(m) == 0 for m in b["malign"]], batched=True, desc="safe rows")

    def fn(batch):
        enc = tokenizer(batch["conversation"], truncation=True, max_length=max_length)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    return safe.map(fn, batched=True, remove_columns=safe.column_names, desc="tokenize lm")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of every left-padded row, so a
    row's outputs do not depend on how much padding its batch needed."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class WithPositions:
    """Wrap a padding collator and add ``position_ids`` computed from the attention mask."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        batch["position_ids"] = positions_from_mask(batch["attention_mask"])
        return batch


def guard_collator(tokenizer, pad_to_multiple_of: int | None):
    from transformers import DataCollatorWithPadding

    return WithPositions(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of))


def lm_collator(tokenizer, pad_to_multiple_of: int | None, packing: bool):
    """Dynamic padding (pad positions get label -100), or padding-free packing: one flattened
    row with ``position_ids`` restarting at every conversation."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return WithPositions(DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=pad_to_multiple_of))


class SeededLengthGroupedSampler(Sampler[int]):
    """Indices in a random order fixed by ``(seed, epoch)``; with ``group_by_length`` every run
    of ``group_size`` consecutive indices has similar lengths (transformers'
    ``get_length_grouped_indices`` with a seeded generator). ``mega_batch_mult``: how many
    groups are sorted together (transformers' default: ``min(n // (4 * group_size), 50)``)."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int, group_by_length: bool = True,
                 mega_batch_mult: int | None = None):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def indices(self) -> list[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if not self.group_by_length:
            return torch.randperm(len(self.lengths), generator=g).tolist()
        return get_length_grouped_indices(self.lengths, self.group_size, self.mega_batch_mult, generator=g)

    def __iter__(self):
        return iter(self.indices())


def split_micro_batch(batch: dict, max_tokens: int, multiple: int | None = None) -> list[dict]:
    """Row chunks of a padded batch with at most ``max_tokens`` positions each (at least one
    row per chunk), each trimmed of the pad-only columns on its padding side (width rounded up
    to ``multiple``). 1-D tensors (labels) are split by row; a batch within budget is returned
    as is."""
    mask = batch["attention_mask"]
    b, n = mask.shape
    if b * n <= max_tokens:
        return [batch]
    per = max(1, max_tokens // n)
    left = bool(mask[:, -1].all())
    right = not left and bool(mask[:, 0].all())
    chunks = []
    for s in range(0, b, per):
        rows = {k: v[s:s + per] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == b else v
                for k, v in batch.items()}
        width = int(rows["attention_mask"].sum(-1).max())
        if multiple:
            width = -(-width // multiple) * multiple
        width = min(max(width, 1), n)
        cols = slice(n - width, n) if left else slice(0, width) if right else slice(0, n)
        chunks.append({k: v[:, cols] if torch.is_tensor(v) and v.dim() == 2 and v.shape == (len(rows["attention_mask"]), n)
                       else v for k, v in rows.items()})
    return chunks


def batches_of(order: Sequence[int], batch_size: int) -> list[Sequence[int]]:
    """``order`` cut into consecutive batches of ``batch_size`` row indices."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]], multiple: int | None = None) -> float:
    """THE padding measure (training sampler and scoring batches alike): the share of computed
    positions that are padding when each batch (row indices into ``lengths``) is padded to its
    longest row, rounded up to ``multiple`` when given."""
    real = padded = 0
    for batch in batches:
        rows = [int(lengths[j]) for j in batch]
        if not rows:
            continue
        width = max(rows)
        if multiple:
            width = -(-width // multiple) * multiple
        real += sum(rows)
        padded += width * len(rows)
    return 0.0 if padded == 0 else 1.0 - real / padded
