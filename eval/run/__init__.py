"""Run orchestration: the evaluation context resolved once from a recipe, loading the backbone,
fitting and caching detector statistics, evaluate, export and score bundles, streamed scoring and
uploads. It uses the engine and writes its results through the reporting modules."""
