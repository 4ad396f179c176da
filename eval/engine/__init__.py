"""The scoring engine: detectors (a leaf package), the detector table, the forward planner, the
forward passes on a loaded backbone, fusion and metrics. It knows no recipe, no run folder and no
file layout above a detector's own statistics (see docs/architecture.md)."""
