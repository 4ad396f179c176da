"""Evaluation: OOD detectors, fusion, metrics, run folders, reports and scaling."""
