"""LP-FT for the guard (``guard.init_head: probe``; Kumar et al., ICLR 2022): before LoRA
fine-tuning, fit a logistic probe on the frozen base's features of the train rows and start the
classification head from it.

* The feature is exactly what the head sees: the sequence-classification model itself runs with
  the adapter disabled (the frozen base) and a forward hook on its ``score`` module that returns
  the module's input, so the model's own pooling (the last non-pad position under left padding)
  picks the hidden state the head would be applied to.
* The probe is sklearn's ``LogisticRegression`` in float64 on features divided by their standard
  deviation (the scale is folded back into the weights). Llama / Qwen / Gemma ``score`` heads have
  no bias: the probe is then fitted without an intercept (features not centred); a head with a
  bias gets standardised features and an intercept.
* The head is written so that logit[1] - logit[0] (the guard score) equals the probe's decision
  function: ``W[1] = w / 2``, ``W[0] = -w / 2`` (and the bias likewise).
* Several processes: the rows are cut into fixed batches (the same for every process count), the
  ranks share them out when every rank holds the weights (all but rank 0 have none under FSDP's
  CPU-RAM-efficient loading: rank 0 then computes all), the features are gathered, rank 0 fits and
  broadcasts the weights: every rank writes the identical head. Under ZeRO-3 the partitioned
  parameters are gathered for the pass (the whole model on every rank for that time).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from .data import batches_of


@dataclass(frozen=True)
class Probe:
    """decision(x) = x @ w + b on raw (unscaled) features."""

    w: np.ndarray  # float64 [hidden]
    b: float
    c: float
    intercept: bool

    def decision(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.w + self.b


def fit_probe(features: np.ndarray, labels, c: float = 1.0, intercept: bool = False) -> Probe:
    """L2 logistic regression (sklearn, lbfgs, float64) on features scaled by their standard
    deviation (and centred when ``intercept``); the scaling is folded back into ``w`` and ``b``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    centre = x.mean(axis=0) if intercept else np.zeros(x.shape[1])
    clf = LogisticRegression(C=c, fit_intercept=intercept, tol=1e-10, max_iter=10_000)
    clf.fit((x - centre) / scale, y)
    w = clf.coef_[0] / scale
    b = float(clf.intercept_[0] - w @ centre) if intercept else 0.0
    return Probe(w=w, b=b, c=float(c), intercept=intercept)


def head_rows(probe: Probe) -> tuple[np.ndarray, np.ndarray]:
    """(weight [2, hidden], bias [2]) whose logit[1] - logit[0] is the probe's decision function."""
    return np.stack([-probe.w / 2, probe.w / 2]), np.array([-probe.b / 2, probe.b / 2])


def head_wrapper(model):
    """peft's ``ModulesToSaveWrapper`` around the classification head (``score`` or ``classifier``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier"):
        module = getattr(base, name, None)
        if module is not None and hasattr(module, "modules_to_save"):
            return module
    raise ValueError("no peft modules_to_save classification head (score / classifier) on the model")


def trainable_head(model):
    """The head that trains and is saved in the adapter (the active modules_to_save copy)."""
    wrapper = head_wrapper(model)
    return wrapper.modules_to_save[wrapper.active_adapters[0]]


def _zero3_gathered(params, modifier_rank):
    from .distributed import zero3_active

    if not zero3_active():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def pooled_features(model, rows, collator, batch_size: int, device, rank: int = 0, workers: int = 1,
                    desc: str = "probe features") -> dict[int, np.ndarray]:
    """The frozen base's pooled features (float64) of this rank's share of ``rows`` (a dataset with
    ``input_ids`` / ``attention_mask`` / ``length``), by batch index: batches of ``batch_size`` rows in
    order of decreasing length (fixed for every process count), batch ``k`` computed by rank
    ``k % workers``."""
    import torch

    from mood_data.console import progress

    lengths = list(rows["length"])
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = batches_of(order, batch_size)
    ids, mask = rows["input_ids"], rows["attention_mask"]
    mine = [k for k in range(len(batches)) if k % workers == rank] if rank < workers else []
    wrapper = head_wrapper(model)
    hook = wrapper.register_forward_hook(lambda module, args, output: args[0])  # "logits" := the head's input
    was_training = model.training
    model.eval()
    out: dict[int, np.ndarray] = {}
    try:
        with torch.no_grad(), model.disable_adapter():
            for k in progress(mine, desc=desc, unit="batch"):
                batch = collator([{"input_ids": ids[i], "attention_mask": mask[i]} for i in batches[k]])
                pooled = model(**{key: v.to(device) for key, v in batch.items()}).logits
                out[k] = pooled.double().cpu().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return out


def assemble(parts: dict[int, np.ndarray], lengths) -> np.ndarray:
    """Rows back in dataset order from the batch-indexed parts of :func:`pooled_features`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    stacked = np.concatenate([parts[k] for k in sorted(parts)])
    out = np.empty_like(stacked)
    out[np.asarray(order)] = stacked
    return out


def probe_head_init(recipe, trainer, datasets) -> dict | None:
    """``guard.init_head: probe``: fit the probe on the train rows, write it into the trainable head
    on every rank; returns the record for metrics.json (train / validation AUROC of the probe).
    A collective: every rank calls it, before ``trainer.train``."""
    import torch
    from accelerate.utils import broadcast_object_list, gather_object
    from sklearn.metrics import roc_auc_score

    sec = recipe.guard
    if sec.init_head != "probe":
        return None
    t0 = time.perf_counter()
    model, acc = trainer.model, trainer.accelerator
    rank, world = acc.process_index, acc.num_processes
    head = trainable_head(model)
    has_weights = not any(p.device.type == "meta" for p in model.parameters())
    workers = world if all(gather_object([has_weights]) if world > 1 else [has_weights]) else 1
    device = trainer.args.device
    home = next(model.parameters()).device
    moved = has_weights and home != device and home.type != "meta"
    if moved:  # DeepSpeed / FSDP place the model later; the pass runs on the accelerator
        model.to(device)
    collator = trainer.data_collator
    features = {}
    with _zero3_gathered(model.parameters(), modifier_rank=None):
        for split in ("train", "validation"):
            rows = datasets[split]
            parts = pooled_features(model, rows, collator, sec.per_device_batch_size, device, rank, workers,
                                    desc=f"probe features ({split})")
            if world > 1:
                parts = dict(kv for part in gather_object([parts]) for kv in part.items())
            features[split] = assemble(parts, rows["length"])
    if moved:
        model.to(home)
    intercept = getattr(head, "bias", None) is not None
    payload = [None]
    if acc.is_main_process:
        y_train, y_val = np.asarray(datasets["train"]["labels"]), np.asarray(datasets["validation"]["labels"])
        probe = fit_probe(features["train"], y_train, sec.probe_c, intercept)
        record = {"method": "probe", "c": sec.probe_c, "intercept": intercept, "n_train": int(len(y_train)),
                  "n_features": int(features["train"].shape[1]),
                  "train_auroc": _auroc(roc_auc_score, y_train, probe.decision(features["train"])),
                  "validation_auroc": _auroc(roc_auc_score, y_val, probe.decision(features["validation"]))}
        payload = [(probe, record)]
    if world > 1:
        broadcast_object_list(payload, from_process=0)
    probe, record = payload[0]
    weight, bias = head_rows(probe)
    params = [head.weight] + ([head.bias] if intercept else [])
    with _zero3_gathered(params, modifier_rank=0), torch.no_grad():
        if head.weight.device.type != "meta":  # FSDP ranks > 0 without weights get rank 0's at wrapping
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            if intercept:
                head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _auroc(roc_auc_score, labels, scores) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None
