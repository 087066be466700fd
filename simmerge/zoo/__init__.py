"""The demo zoo: tiny Llama checkpoints (bases and experts), synthetic tasks and probes."""

from simmerge.zoo.build import RECIPES, ZOO_VERSION, build_zoo, read_catalog, select_tasks
from simmerge.zoo.tasks import TASKS, vocabulary

__all__ = ["RECIPES", "TASKS", "ZOO_VERSION", "build_zoo", "read_catalog", "select_tasks", "vocabulary"]
