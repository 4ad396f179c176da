"""MOOD data layer: schema, domain registry, rendering, loading and validation."""
from .domains import DEFAULT_REGISTRY, ID_DOMAINS, OOD_DOMAINS, OPT_IN_DOMAINS, DomainRegistry, load_registry
from .errors import BundleError, DataError, MoodguardError, RecipeError
from .load import LeakageWarning, Splits, leakage_report, load_split_file, load_splits
from .render import render

__all__ = [
    "DEFAULT_REGISTRY", "ID_DOMAINS", "OOD_DOMAINS", "OPT_IN_DOMAINS", "DomainRegistry",
    "load_registry", "BundleError", "DataError", "MoodguardError", "RecipeError", "render",
    "LeakageWarning", "Splits", "leakage_report", "load_split_file", "load_splits",
]
