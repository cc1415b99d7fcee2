"""A test domain's group: ID, near-OOD, far-OOD, or OOD where its source does not say which.

- ``id``: a meta-training domain (tested on its test classes);
- ``near_ood``: test classes only, drawn by a generator that also draws training data (built-in);
- ``far_ood``: test classes only, from a source or generator that no training domain uses (built-in);
- ``far_ood_val``: a far-OOD source kept for choosing settings, never tested by default (built-in
  ``relief_patches``); evaluated alone, it is its own group and counts towards ``ood``;
- ``ood``: test classes only, group not declared (image folders, ``--folder``, Meta-Dataset's test sources).

Averages are taken per group, and ``ood`` also names the average over every test-only domain (near, far and
undeclared), so a source without declared groups reports ID and OOD as before.
"""

from __future__ import annotations

GROUPS = ("id", "near_ood", "far_ood", "ood")
OOD_GROUPS = ("near_ood", "far_ood", "far_ood_val", "ood")
LABELS = {"id": "ID", "near_ood": "near-OOD", "far_ood": "far-OOD", "far_ood_val": "far-OOD validation", "ood": "OOD"}


NOTE = ("Groups: ID = the meta-training domains' test classes; near-OOD = unseen classes drawn by a training "
        "generator; far-OOD = sources and generators that no training domain uses (real handwriting and photos, "
        "unseen typefaces, renderers and colour schemes).")


def label(group: str) -> str:
    """'ID', 'near-OOD', 'far-OOD' or 'OOD' (a name outside GROUPS as it is, upper case)."""
    return LABELS.get(group, group.upper())


def in_group(group: str, key: str) -> bool:
    """Whether a domain of ``group`` counts towards the average ``key`` (``ood``: every test-only domain)."""
    return group in OOD_GROUPS if key == "ood" else group == key


def average_keys(groups) -> list[str]:
    """The averages to report for domains of these groups, in GROUPS order: each group present, and ``ood``
    (all test-only domains) when any is present."""
    present = set(groups)
    keys = [g for g in GROUPS[:3] if g in present]
    return keys + (["ood"] if present & set(OOD_GROUPS) else [])


def distinct_average_keys(groups) -> list[str]:
    """average_keys without an ``ood`` row that would repeat a single OOD group's row (for tables)."""
    keys = average_keys(groups)
    if "ood" in keys and len([k for k in keys if k in OOD_GROUPS and k != "ood"]) == 1 and "ood" not in set(groups):
        keys.remove("ood")
    return keys


def record_group(record: dict) -> str:
    """The group of a stored per-domain record: its 'group', else its 'role' (records written before groups)."""
    return record.get("group") or record["role"]
