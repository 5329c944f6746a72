"""The pedestrian-attribute schema: 12 groups, their class names, and the Market-1501 CSV coding.

One schema is used everywhere (training labels, bundle manifests, service responses, filters), so a
class name such as ``upper_colour=red`` means the same thing in every part of the product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MULTICOLOUR = "multicolour"


@dataclass(frozen=True)
class AttributeGroup:
    """One classification head: a name, its class names and the CSV columns that encode it."""

    name: str
    classes: tuple[str, ...]
    # Binary/age groups read one column whose value is 1-based; colour groups read one column per
    # colour (2 = present) and fall back to ``multicolour`` when none is marked.
    columns: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_colour(self) -> bool:
        return len(self.columns) > 1


UPPER_COLOURS = ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")
LOWER_COLOURS = ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")

ATTRIBUTE_GROUPS: tuple[AttributeGroup, ...] = (
    AttributeGroup("gender", ("male", "female"), ("gender",)),
    AttributeGroup("hair", ("short", "long"), ("hair",)),
    AttributeGroup("sleeve_length", ("long", "short"), ("up",)),
    AttributeGroup("lower_length", ("long", "short"), ("down",)),
    AttributeGroup("lower_type", ("dress", "pants"), ("clothes",)),
    AttributeGroup("hat", ("no", "yes"), ("hat",)),
    AttributeGroup("backpack", ("no", "yes"), ("backpack",)),
    AttributeGroup("bag", ("no", "yes"), ("bag",)),
    AttributeGroup("handbag", ("no", "yes"), ("handbag",)),
    AttributeGroup("age", ("young", "teenager", "adult", "old"), ("age",)),
    AttributeGroup("upper_colour", (*UPPER_COLOURS, MULTICOLOUR), tuple(f"up{c}" for c in UPPER_COLOURS)),
    AttributeGroup("lower_colour", (*LOWER_COLOURS, MULTICOLOUR), tuple(f"down{c}" for c in LOWER_COLOURS)),
)
GROUPS_BY_NAME: dict[str, AttributeGroup] = {g.name: g for g in ATTRIBUTE_GROUPS}

# Column order of the course's annotations_train.csv; predictions are written in exactly this order.
CSV_COLUMNS: tuple[str, ...] = (
    "id", "age", "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    *(f"up{c}" for c in UPPER_COLOURS), *(f"down{c}" for c in LOWER_COLOURS),
)  # fmt: skip

Labels = dict[str, int]


class AnnotationError(ValueError):
    """A CSV/MAT annotation row that does not fit the schema."""


def labels_from_row(row: Mapping[str, str | int]) -> Labels:
    """Decode one annotation row (values 1/2, age 1-4) into a class index per group."""
    labels: Labels = {}
    for group in ATTRIBUTE_GROUPS:
        try:
            values = [int(row[c]) for c in group.columns]
        except KeyError as exc:
            raise AnnotationError(f"missing column {exc.args[0]!r}") from None
        except ValueError:
            raise AnnotationError(f"non-integer value in columns {group.columns}") from None
        if group.is_colour:
            if any(v not in (1, 2) for v in values):
                raise AnnotationError(f"{group.name}: values must be 1 or 2, got {values}")
            marked = [i for i, v in enumerate(values) if v == 2]
            # Several marked colours are as ambiguous as none: both count as multicolour.
            labels[group.name] = marked[0] if len(marked) == 1 else group.num_classes - 1
        else:
            (value,) = values
            if not 1 <= value <= group.num_classes:
                raise AnnotationError(f"{group.name}: value {value} outside 1..{group.num_classes}")
            labels[group.name] = value - 1
    return labels


def row_from_labels(labels: Mapping[str, int], identifier: str) -> dict[str, str | int]:
    """Encode class indices back into the CSV coding, keyed by ``CSV_COLUMNS``."""
    row: dict[str, str | int] = {"id": identifier}
    for group in ATTRIBUTE_GROUPS:
        index = int(labels[group.name])
        if group.is_colour:
            for i, column in enumerate(group.columns):
                row[column] = 2 if i == index else 1
        else:
            row[group.columns[0]] = index + 1
    return {c: row[c] for c in CSV_COLUMNS}


def schema_as_dict(groups: Sequence[AttributeGroup] = ATTRIBUTE_GROUPS) -> list[dict[str, object]]:
    """The schema as plain data for manifests and API responses."""
    return [{"name": g.name, "classes": list(g.classes)} for g in groups]
