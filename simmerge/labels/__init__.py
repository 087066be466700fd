"""Ground-truth merge labels: enumerate a grid of plans over a zoo, merge, score, store as Parquet."""

from simmerge.labels.grid import GRIDS, LabelPlan, enumerate_plans
from simmerge.labels.normalise import held_in_score, held_out_score
from simmerge.labels.run import LabelSummary, label_plans, label_zoo
from simmerge.labels.store import SCHEMA, SCHEMA_VERSION, LabelStore, read_labels
from simmerge.labels.zoo import Zoo, ZooCheckpoint, read_zoo

__all__ = [
    "GRIDS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "LabelPlan",
    "LabelStore",
    "LabelSummary",
    "Zoo",
    "ZooCheckpoint",
    "enumerate_plans",
    "held_in_score",
    "held_out_score",
    "label_plans",
    "label_zoo",
    "read_labels",
    "read_zoo",
]
