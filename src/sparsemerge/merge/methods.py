"""Import every merge method module so that each registers itself in ``MERGE_METHODS``."""
from sparsemerge.merge import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    orthogonal,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
