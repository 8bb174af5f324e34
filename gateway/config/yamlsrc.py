"""YAML with line numbers: mappings and sequences remember where each entry stood.

How the trees are read and problems said (Source, LineMap, check_keys, ...) is in
config/source.py; this module only turns YAML text into such trees."""

from __future__ import annotations

from typing import Any

import yaml

from gateway.config.source import LineList, LineMap, Source


def _loader_classes() -> tuple[type[Any], type[Any]]:
    """(fast, stepwise) loaders with the same constructors and line numbers.

    fast: libyaml's parser and composer (CSafeLoader) where pyyaml was built with it,
    else the pure loader. stepwise: libyaml's event parser under the pure-Python composer,
    so parsing a large file in a thread returns to the interpreter between events and
    never holds the event loop off (a reload); without libyaml, the pure loader."""
    if not getattr(yaml, "__with_libyaml__", False):
        return yaml.SafeLoader, yaml.SafeLoader
    from yaml._yaml import CParser
    from yaml.composer import Composer
    from yaml.constructor import SafeConstructor
    from yaml.resolver import Resolver

    class FastLoader(yaml.CSafeLoader):
        resolve = _resolve

    class StepLoader(Composer, CParser, SafeConstructor, Resolver):
        resolve = _resolve

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    return FastLoader, StepLoader


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"


def _resolve(loader: Any, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
    """pyyaml's Resolver.resolve for a loader with no path resolvers (the safe one):
    the same tags, without building a list of candidates for every scalar (composing
    calls it once per node: a third of the C composer's time at 10k models)."""
    if kind is yaml.ScalarNode:
        if implicit[0]:
            for tag, regexp in loader.yaml_implicit_resolvers.get(value[:1], ()):
                if regexp.match(value):
                    return str(tag)
        return _STR
    return _SEQ if kind is yaml.SequenceNode else _MAP


def _with_lines(base: type[Any]) -> type[Any]:
    loader: Any = type(f"Line{base.__name__}", (base,), {"duplicates": []})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)
    for kind in ("bool", "int", "float", "timestamp"):
        tag = f"tag:yaml.org,2002:{kind}"
        loader.add_constructor(tag, _checked(kind, loader.yaml_constructors[tag]))
    built: type[Any] = loader
    return built


def _checked(kind: str, construct: Any) -> Any:
    """pyyaml's scalar constructors raise plain ValueError, KeyError or AttributeError on
    `!!int abc` or `2027-13-01` (a traceback, not a problem with a line): here that
    becomes a YAML error at the value's line. A date-shaped value that is no date
    (`2027-13-01`) stays the string it is, for its field's check to name."""

    def checked(loader: Any, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, AttributeError, OverflowError):
            if kind == "timestamp" and isinstance(node.value, str):
                return node.value
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {kind}", node.start_mark
            ) from None

    return checked


# The constructor-by-constructor path: pyyaml's construct_object calls these for every
# node. It is the reference the walker below must match (tests/config/test_yamlsrc.py),
# and what the walker hands any node with an unusual tag to.


def _construct_map(loader: Any, node: yaml.MappingNode) -> LineMap:
    _expect(node, yaml.MappingNode)
    loader.flatten_mapping(node)
    out = LineMap()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            key = str(key)
        if key in out:
            loader.duplicates.append((line, f"duplicate key {key!r}"))
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: Any, node: yaml.SequenceNode) -> LineList:
    _expect(node, yaml.SequenceNode)
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


def _expect(node: Any, kind: Any) -> None:
    """`!!map [1]` or `!!seq {a: 1}`: pyyaml's own words, not a TypeError's traceback."""
    if not isinstance(node, kind):
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a {kind.id} node, but found {node.id}", node.start_mark
        )


# Keys that flatten_mapping rewrites (`<<: *base` merges, the `=` value key).
_SPECIAL_KEYS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})
_INT = "tag:yaml.org,2002:int"
_SCALARS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("null", "bool", "int", "float", "timestamp")
)


def build(loader: Any, root: yaml.Node) -> Any:
    """The composed document as LineMap/LineList/scalars: what pyyaml's constructors
    (_construct_map, _construct_seq) make of it, without their per-node machinery
    (a generic dispatch, deep-construction state and a memo entry for every node: 80 %
    of loading 10k models and keys). Plain strings, maps and sequences are built here;
    any other tag goes to the constructor path itself, so its values and errors are
    pyyaml's. Aliased containers are built once and a container inside itself is the
    same error at the same node (the loader's own memo and in-progress table)."""
    constructors = loader.yaml_constructors
    memo: dict[yaml.Node, Any] = loader.constructed_objects
    busy: dict[yaml.Node, None] = loader.recursive_objects
    duplicates: list[tuple[int, str]] = loader.duplicates
    scalar_node, mapping_node, sequence_node = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode

    def walk(node: Any) -> Any:
        kind, tag = node.__class__, node.tag
        if kind is scalar_node:
            if tag == _STR:
                return node.value
            if tag in _SCALARS:
                return constructors[tag](loader, node)
            return loader.construct_object(node, deep=True)
        if node in memo:
            return memo[node]
        if node in busy:
            raise yaml.constructor.ConstructorError(
                None, None, "found unconstructable recursive node", node.start_mark
            )
        if kind is mapping_node and tag == _MAP:
            busy[node] = None
            out: Any = _walk_map(node)
        elif kind is sequence_node and tag == _SEQ:
            busy[node] = None
            out = LineList([walk(child) for child in node.value])
            out.line = node.start_mark.line + 1
            out.lines = [child.start_mark.line + 1 for child in node.value]
        else:
            return loader.construct_object(node, deep=True)
        memo[node] = out
        del busy[node]
        return out

    def _walk_map(node: yaml.MappingNode) -> LineMap:
        pairs = node.value
        if any(key_node.tag in _SPECIAL_KEYS for key_node, _ in pairs):
            loader.flatten_mapping(node)
            pairs = node.value
        out = LineMap()
        out.line = node.start_mark.line + 1
        out.lines = lines = {}
        for key_node, value_node in pairs:
            if key_node.__class__ is scalar_node and key_node.tag == _STR:
                key = key_node.value
            else:
                key = walk(key_node)
                if not isinstance(key, str):
                    key = str(key)
            line = key_node.start_mark.line + 1
            if key in out:
                duplicates.append((line, f"duplicate key {key!r}"))
            out[key] = walk(value_node)
            lines[key] = line
        return out

    return walk(root)


class Loaders:
    """Built on first use, not at import (nothing is built at import time)."""

    _built: tuple[type[Any], type[Any]] | None = None

    @classmethod
    def get(cls, stepwise: bool) -> type[Any]:
        if cls._built is None:
            fast, step = _loader_classes()
            cls._built = (_with_lines(fast), _with_lines(step))
        return cls._built[1 if stepwise else 0]


class _Unusual(Exception):
    """A document `from_events` leaves to the node path (anchors, aliases, explicit tags,
    merge keys, complex keys, a second document, a syntax error)."""


def from_events(loader: Any) -> tuple[Any, list[tuple[int, str]]]:
    """The document straight from the parser's events: what `build` makes of the
    composed nodes, and its duplicate keys, without the nodes (composing them costs more
    than the parse itself: a node object, three resolver calls and a memo entry each).
    Only plain documents: anything else raises _Unusual and takes the node path, which
    then also gives pyyaml's own errors. An explicit stack: no recursion, any depth."""
    get = loader.get_event
    # Plain scalars as built, by their text: a file repeats its field names and most
    # values (`providers`, `rpm`, `600`), each a resolver's regular expressions and maybe
    # a constructor. Every value built is immutable; bounded, as slugs and names are not.
    seen: dict[str, Any] = {}
    scalar_event = yaml.ScalarEvent
    map_start, seq_start = yaml.MappingStartEvent, yaml.SequenceStartEvent
    duplicates: list[tuple[int, str]] = []
    # The open containers: (container, its lines, its parent's key for it, that key's line).
    stack: list[tuple[Any, Any, Any, int]] = []
    current: Any = None
    lines: Any = None  # current.lines
    is_map = False
    key: Any = None  # in a mapping: the key read, waiting for its value
    key_line = 0
    get()  # StreamStart
    if get().__class__ is not yaml.DocumentStartEvent:
        return None, duplicates  # an empty stream
    while True:
        event = get()
        kind = event.__class__
        if kind is scalar_event:
            if event.anchor is not None or (event.tag is not None and event.tag != "!"):
                raise _Unusual
            value = event.value
            if event.implicit[0]:
                text = value
                value = seen.get(text, seen)
                if value is seen:
                    value = _plain(loader, event, text)
                    if len(seen) < _SEEN:
                        seen[text] = value
            if is_map:
                if key is None:
                    key = value if value.__class__ is str else str(value)
                    key_line = event.start_mark.line + 1
                    if key in current:
                        duplicates.append((key_line, f"duplicate key {key!r}"))
                    continue
                current[key] = value
                lines[key] = key_line
                key = None
            elif current is not None:
                current.append(value)
                lines.append(event.start_mark.line + 1)
            else:  # the document is this scalar
                _end(get)
                return value, duplicates
            continue
        if kind is map_start or kind is seq_start:
            if event.anchor is not None or (event.tag is not None and event.tag != "!"):
                raise _Unusual
            if is_map and key is None:
                raise _Unusual  # a mapping or a list as a key
            stack.append((current, lines, key, key_line))
            is_map = kind is map_start
            current = LineMap() if is_map else LineList()
            current.line = event.start_mark.line + 1
            current.lines = lines = {} if is_map else []
            key = None
            continue
        if kind is not yaml.MappingEndEvent and kind is not yaml.SequenceEndEvent:
            raise _Unusual  # an alias
        value = current
        current, lines, key, key_line = stack.pop()
        if current is None:
            break  # the document is this container
        if key is not None:  # only a mapping holds a key while its value is read
            current[key] = value
            lines[key] = key_line
            key = None
        else:
            is_map = False
            current.append(value)
            lines.append(value.line)
            continue
        is_map = True
    _end(get)
    return value, duplicates


_SEEN = 4096


def _plain(loader: Any, event: Any, value: str) -> Any:
    """A plain scalar's value, as the resolver and the constructors make it."""
    for tag, regexp in loader.yaml_implicit_resolvers.get(value[:1], ()):
        if regexp.match(value):
            if tag == _INT and value.isdigit() and (value[0] != "0" or value == "0"):
                return int(value)  # pyyaml's value (a leading 0 is octal there)
            if tag not in _SCALARS:
                raise _Unusual  # `<<`, `=`
            node = yaml.ScalarNode(tag, value, event.start_mark, event.end_mark)
            return loader.yaml_constructors[tag](loader, node)
    return value


def _end(get: Any) -> None:
    get()  # DocumentEnd (the parser has checked it)
    if get().__class__ is not yaml.StreamEndEvent:
        raise _Unusual  # a second document: the node path says so


def parse_yaml(text: str, src: Source, stepwise: bool = False) -> Any:
    """Parse one YAML document; a syntax error becomes a problem and None. `stepwise`:
    for a parse in a thread beside the event loop (see _loader_classes)."""
    loader = Loaders.get(stepwise)(text)
    try:
        data, duplicates = from_events(loader)
    except (_Unusual, yaml.YAMLError):
        return parse_nodes(text, src, stepwise)  # it parses again and says what is wrong
    finally:
        loader.dispose()
    for line, message in duplicates:
        src.problem(line, message)
    return data


def parse_nodes(text: str, src: Source, stepwise: bool = False, reference: bool = False) -> Any:
    """parse_yaml by composing the nodes, then `build`, or with `reference` pyyaml's
    constructor path over them (the same result: the tests' oracle)."""
    loader = Loaders.get(stepwise)(text)
    loader.duplicates = []
    node = None
    try:
        node = loader.get_single_node()
        if node is None:
            data = None
        elif reference:
            data = loader.construct_document(node)
        else:
            data = build(loader, node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        src.problem(line, f"invalid YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        src.problem(1, f"invalid YAML: {exc}")
        return None
    except RecursionError:
        # libyaml stops at 1,000 levels; the composers and `build` recurse in Python
        # and can meet the interpreter's limit a few hundred levels before that.
        src.problem(1, "invalid YAML: nested too deeply")
        return None
    finally:
        loader.dispose()
        if stepwise:
            release(node)
    for line, message in loader.duplicates:
        src.problem(line, message)
    return data


RELEASE_AT = 64  # containers larger than this are emptied piece by piece


def release(tree: Any) -> None:
    """Free a large tree (YAML nodes, parsed data) a piece at a time.

    Dropping the last reference to a tree of a million objects frees them all in one C
    call, ~170 ms with the interpreter lock held: in a reload thread that would stall
    the event loop just the same. Emptied here a container at a time, the lock is
    handed over between pieces."""
    stack = [tree]
    while stack:
        item = stack.pop()
        value = getattr(item, "value", item)  # a YAML node holds its children in .value
        if isinstance(value, dict):
            while value:
                _, child = value.popitem()
                if _large(child):
                    stack.append(child)
        elif isinstance(value, list):
            while value:
                child = value.pop()
                for part in child if isinstance(child, tuple) else (child,):
                    if _large(part):
                        stack.append(part)


def _large(item: Any) -> bool:
    value = getattr(item, "value", item)
    return isinstance(value, dict | list) and len(value) > RELEASE_AT
