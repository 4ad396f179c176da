"""The detectors: a leaf package (it imports nothing else of eval). Every score: higher = more
unsafe / more OOD.

* :mod:`.base` -- the protocol (:class:`~.base.Detector`: ``name``, ``needs``, ``requires_fit``,
  ``Settings``; ``fit_stream`` / ``score`` / ``save`` / ``load``) and what a detector can read;
* :mod:`.logits` -- the guard's log-odds, energy, max-logit (and log-prob, the worked example);
* :mod:`.mahalanobis` -- streaming float64 Gaussian (empirical / Ledoit-Wolf / OAS), variants
  ``plain``, ``class_conditional``, ``relative``;
* :mod:`.knn` -- k-th nearest-neighbour distance on L2-normalised features;
* :mod:`.perplexity` -- perplexity from the LM pass's token NLL;
* :mod:`.ensemble` -- mean / min / disagreement of seed members' log-odds;
* :mod:`.judge` -- an instruction-tuned judge's expected answer under a rubric;
* :mod:`.tensors` -- the validated safetensors I/O of fitted statistics.

The table of them all is :mod:`eval.engine.table`.
"""
