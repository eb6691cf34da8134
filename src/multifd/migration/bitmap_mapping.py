"""QEMU 7.2's checks of the block-bitmap-mapping parameter: its members' types,
then the aliases' rules (construct_alias_map). Nothing here reads the mapping:
block migration is not implemented, the parameter is only kept and reported."""

from __future__ import annotations

import re
from typing import Any

# QEMU's BitmapMigrationNodeAlias and BitmapMigrationBitmapAlias: member →
# (JSON type, required).
_NODE_ALIAS = {"node-name": (str, True), "alias": (str, True), "bitmaps": (list, True)}
_BITMAP_ALIAS = {"name": (str, True), "alias": (str, True), "transform": (dict, False)}
_TRANSFORM = {"persistent": (bool, False)}
_JSON_TYPES = {str: "string", list: "array", dict: "object", bool: "boolean"}
# QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
MAX_ALIAS_BYTES = 255


def bitmap_mapping_problem(name: str, value: Any) -> str | None:
    """What QEMU would refuse in `value`, in its words; None if nothing."""
    if not isinstance(value, list):
        return f"Invalid parameter type for '{name}', expected: array"
    for i, node in enumerate(value):
        problem = _members_problem(f"{name}[{i}]", node, _NODE_ALIAS)
        for j, bitmap in enumerate(node["bitmaps"] if problem is None else ()):
            where = f"{name}[{i}].bitmaps[{j}]"
            problem = _members_problem(where, bitmap, _BITMAP_ALIAS)
            if problem is None and "transform" in bitmap:
                problem = _members_problem(f"{where}.transform", bitmap["transform"], _TRANSFORM)
            if problem is not None:
                break
        if problem is not None:
            return problem
    problem = _alias_problem(value)
    return f"Invalid mapping given for {name}: {problem}" if problem else None


def _members_problem(where: str, value: Any, members: dict[str, tuple[type, bool]]) -> str | None:
    if not isinstance(value, dict):
        return f"Invalid parameter type for '{where}', expected: object"
    # In QEMU's order: the members as declared, then any it does not know.
    for member, (kind, required) in members.items():
        if member not in value:
            if required:
                return f"Parameter '{where}.{member}' is missing"
            continue
        if not isinstance(value[member], kind):
            return f"Invalid parameter type for '{where}.{member}', expected: {_JSON_TYPES[kind]}"
    for member in value:
        if member not in members:
            return f"Parameter '{where}.{member}' is unexpected"
    return None


def _alias_problem(nodes: list[dict[str, Any]]) -> str | None:
    """As the source checks it: each node and bitmap named once, each alias
    used once and well formed (a node's; a bitmap's may be any string)."""
    node_names: set[str] = set()
    node_aliases: set[str] = set()
    for node in nodes:
        alias = node["alias"]
        if len(alias.encode()) > MAX_ALIAS_BYTES:
            return _too_long("node", alias)
        if not _WELL_FORMED.fullmatch(alias):
            return f"The node alias '{alias}' is not well-formed"
        if node["node-name"] in node_names:
            return f"The node name '{node['node-name']}' is mapped twice"
        if alias in node_aliases:
            return f"The node alias '{alias}' is used twice"
        node_names.add(node["node-name"])
        node_aliases.add(alias)
        bitmap_names: set[str] = set()
        bitmap_aliases: set[str] = set()
        for bitmap in node["bitmaps"]:
            if len(bitmap["alias"].encode()) > MAX_ALIAS_BYTES:
                return (
                    f"The bitmap alias '{bitmap['alias']}' is longer than {MAX_ALIAS_BYTES} bytes"
                )
            if bitmap["name"] in bitmap_names:
                return f"The bitmap '{node['node-name']}'/'{bitmap['name']}' is mapped twice"
            if bitmap["alias"] in bitmap_aliases:
                return f"The bitmap alias '{alias}'/'{bitmap['alias']}' is used twice"
            bitmap_names.add(bitmap["name"])
            bitmap_aliases.add(bitmap["alias"])
    return None


def _too_long(kind: str, alias: str) -> str:
    return f"The {kind} alias '{alias}' is longer than {MAX_ALIAS_BYTES} bytes"
