"""Tasks: what classification, segmentation, edge detection and object detection mean, one module each.

    >>> from kseg.tasks import get_task
    >>> get_task("segmentation").head(["logits", "stride8"]).output_index
    0

A registry spec names its task (`spec.task`); `get_task(name)` gives the object every other
layer asks (heads, labels, default loss and metrics, data layouts, serving outputs,
verification). A new task is its module here and one line in TASKS.
"""

from __future__ import annotations

from kseg.tasks.base import Evaluator, Head, OutputReport, Task
from kseg.tasks.classification import CLASSIFICATION
from kseg.tasks.detection import DETECTION
from kseg.tasks.edges import EDGES
from kseg.tasks.segmentation import SEGMENTATION
from kseg.tasks.skeleton import SKELETON

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, SEGMENTATION, EDGES, DETECTION, SKELETON)}


def get_task(name) -> Task:
    """The task object of a name (a Task passes through); an unknown name raises, listing the known."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Evaluator", "Head", "OutputReport", "Task", "get_task"]
