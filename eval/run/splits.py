"""The data of an evaluation: the one train / validation cut and the test split, each read once."""
from __future__ import annotations

from .context import DataSpec


def data_cut(data: DataSpec, train_split=None) -> tuple:
    """THE train / validation cut of the data (:func:`train.data.validation_cut`)."""
    from train.data import validation_cut

    return validation_cut(data.source, template=data.template, registry=data.registry,
                          fraction=data.validation_fraction, max_rows=data.max_train_rows, train_split=train_split,
                          groups=data.validation_groups)


def eval_splits(data: DataSpec) -> tuple[dict, tuple]:
    """``({"test": ..., ["train": ...]}, (train, validation))`` with the test split read ONCE: where
    the cut alone would read it too (a source with a local test split, for its leakage check), the
    train split comes from the same ``load_splits`` call."""
    from mood_data.load import load_splits
    from mood_data.sources import has_local_test_split

    both = has_local_test_split(data.source)
    splits = load_splits(data.source, splits=("train", "test") if both else ("test",),
                         registry=data.registry, template=data.template)
    return splits, data_cut(data, splits.get("train"))


__all__ = ["data_cut", "eval_splits"]
