"""JSON schemas from clients (``response_format``, tool parameters), bounded before a backend
sees one: llama.cpp turns a schema into a grammar in C++, and measured on the pinned build a
20,000-value enum or a left-recursive ``$ref`` keeps a slot busy for minutes, and deep nesting
costs a grammar rule per level. So a schema must be small, shallow, its references local and
acyclic; what is refused gets a 400 that says which bound it passed."""

from __future__ import annotations

import json

MAX_BYTES = 32_768  # the schema as JSON text
MAX_DEPTH = 32  # JSON nesting (objects and lists), about 16 levels of subschemas
MAX_NODES = 2_000  # subschema objects in all
MAX_ENUM = 256  # enum and const values in all
MAX_REPEAT = 256  # minItems, maxLength ...: llama.cpp writes one grammar rule per repetition
MAX_PATTERN = 256  # characters of a regular expression (compiled into grammar rules)
REPEATS = (
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)


def schema_problem(schema: object, where: str) -> str | None:
    """What makes ``schema`` unsafe or invalid to forward, or None."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"'{where}' must be a JSON schema (an object)"
    try:
        size = len(json.dumps(schema))
    except (ValueError, RecursionError):
        return f"'{where}' is nested too deeply"
    if size > MAX_BYTES:
        return f"'{where}' is larger than {MAX_BYTES} bytes"
    refs: list[str] = []
    problem = _walk(schema, where, refs)
    return problem or _refs_problem(schema, refs, where)


def _walk(schema: dict, where: str, refs: list[str]) -> str | None:
    nodes = enums = 0
    stack: list[tuple[object, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"'{where}' is nested more than {MAX_DEPTH} levels deep"
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        nodes += 1
        if nodes > MAX_NODES:
            return f"'{where}' has more than {MAX_NODES} subschemas"
        if isinstance(node.get("enum"), list):
            enums += len(node["enum"])
        enums += "const" in node
        if enums > MAX_ENUM:
            return f"'{where}' lists more than {MAX_ENUM} enum values"
        if problem := _keyword_problem(node, where):
            return problem
        if "$ref" in node:
            refs.append(node["$ref"])
        stack.extend((value, depth + 1) for value in node.values() if isinstance(value, (dict, list)))
    return None


def _keyword_problem(node: dict, where: str) -> str | None:
    for key in REPEATS:
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= MAX_REPEAT:
            return f"'{where}': {key} must be from 0 to {MAX_REPEAT}"
    pattern = node.get("pattern")
    if isinstance(pattern, str) and len(pattern) > MAX_PATTERN:
        return f"'{where}': a pattern may have at most {MAX_PATTERN} characters"
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        return f"'{where}': only references into the schema itself ('#/...') are allowed"
    return None


def _resolve(schema: dict, ref: str) -> object:
    node: object = schema
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _refs_within(node: object) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                found.add(item["$ref"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _refs_problem(schema: dict, refs: list[str], where: str) -> str | None:
    """Every reference resolves, and none leads back to itself (a recursive schema: llama.cpp's
    grammar for a left-recursive one never finishes)."""
    graph: dict[str, set[str]] = {}
    for ref in set(refs):
        target = _resolve(schema, ref)
        if target is None:
            return f"'{where}': the reference {ref[:80]} points at nothing"
        graph[ref] = _refs_within(target)
    state: dict[str, int] = {}  # 1: on the path being followed, 2: finished

    def cyclic(ref: str) -> bool:
        state[ref] = 1
        for nxt in graph.get(ref, ()):
            if state.get(nxt) == 1 or (state.get(nxt) is None and cyclic(nxt)):
                return True
        state[ref] = 2
        return False

    try:
        recursive = any(state.get(ref) is None and cyclic(ref) for ref in graph)
    except RecursionError:  # a chain of references longer than Python's stack: far past any real schema
        recursive = True
    if recursive:
        return f"'{where}': recursive references (a schema that contains itself) are not supported"
    return None
