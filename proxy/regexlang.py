"""Regular languages of RE2 patterns, as terms with Brzozowski derivatives. Pure.

Push-down (pushdown.py) must answer questions about every string a relabel regex can match, not
one string: "does this keep regex match no name of collector c?" (an empty intersection), "does
this drop regex match every name of c?" (inclusion). A regex engine answers only per string, so
this module models a pattern's language instead: terms with union, concatenation, star,
intersection and complement, hash-consed so equal terms are one object, and derivatives by a
character, which decide emptiness by exploring the states a term can reach (with a bound:
past STATE_LIMIT the answer is Unknown).

Only a subset of RE2 is parsed (literals, escapes, `.`, classes with ranges and negation,
groups, alternation, `* + ? {m,n}` and their lazy forms); anything else raises Unknown, which a
caller must read as "could match anything". Relabel regexes are fully anchored and `.` matches a
newline there, as Prometheus compiles them.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

# How many derivative states one regex question may visit before it is given up as unknown.
STATE_LIMIT = 4000


class Unknown(Exception):
    """A regex construct outside the supported subset, or a question too big to answer."""


# -- character sets: sorted, disjoint, non-adjacent (lo, hi) code point ranges ----------------------

MAX_CHAR = 0x10FFFF
CharSet = tuple[tuple[int, int], ...]
ALL: CharSet = ((0, MAX_CHAR),)
NONE: CharSet = ()


def charset(ranges: Iterable[tuple[int, int]]) -> CharSet:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def cs_complement(s: CharSet) -> CharSet:
    out = []
    start = 0
    for lo, hi in s:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CHAR:
        out.append((start, MAX_CHAR))
    return tuple(out)


def cs_intersect(a: CharSet, b: CharSet) -> CharSet:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def cs_contains(s: CharSet, ch: int) -> bool:
    return any(lo <= ch <= hi for lo, hi in s)


def _chars_of(text: str) -> CharSet:
    return charset((ord(c), ord(c)) for c in text)


DIGIT = charset([(0x30, 0x39)])
WORD = charset([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE = _chars_of("\t\n\f\r ")  # RE2's \s: no \v
LEGACY_NAME = charset([*WORD, (0x3A, 0x3A)])  # [a-zA-Z0-9_:]


# -- extended regular expressions, hash-consed so equal terms are the same object --------------------


class Node:
    """A regular expression term (with intersection and complement); build with the functions below."""

    __slots__ = ("__weakref__", "args", "derivs", "kind", "nullable")

    def __init__(self, kind: str, args: tuple[Any, ...], nullable: bool) -> None:
        self.kind = kind
        self.args = args
        self.nullable = nullable
        self.derivs: dict[int, Node] = {}


_TERMS: weakref.WeakValueDictionary[tuple[Any, ...], Node] = weakref.WeakValueDictionary()


def _term(kind: str, args: tuple[Any, ...], nullable: bool) -> Node:
    key = (kind, args)
    node = _TERMS.get(key)
    if node is None:
        node = Node(kind, args, nullable)
        _TERMS[key] = node
    return node


EMPTY = _term("empty", (), False)  # no string at all
EPS = _term("eps", (), True)  # the empty string only


def chars(s: CharSet) -> Node:
    return EMPTY if not s else _term("chars", (s,), False)


def cat(a: Node, b: Node) -> Node:
    if a is EMPTY or b is EMPTY:
        return EMPTY
    if a is EPS:
        return b
    if b is EPS:
        return a
    if a.kind == "cat":  # right-associated, so equal concatenations are one term
        return cat(a.args[0], cat(a.args[1], b))
    return _term("cat", (a, b), a.nullable and b.nullable)


def alt(items: Iterable[Node]) -> Node:
    members: set[Node] = set()
    char_union: list[tuple[int, int]] = []
    for item in items:
        for x in item.args[0] if item.kind == "alt" else (item,):
            if x is EMPTY:
                continue
            if x is ANY:
                return ANY
            if x.kind == "chars":
                char_union.extend(x.args[0])
            else:
                members.add(x)
    if char_union:
        members.add(chars(charset(char_union)))
    if not members:
        return EMPTY
    if len(members) == 1:
        return next(iter(members))
    group = frozenset(members)
    return _term("alt", (group,), any(m.nullable for m in group))


def both(items: Iterable[Node]) -> Node:
    """Intersection."""
    members: set[Node] = set()
    char_meet: CharSet | None = None
    for item in items:
        for x in item.args[0] if item.kind == "and" else (item,):
            if x is EMPTY:
                return EMPTY
            if x is ANY:
                continue
            if x.kind == "chars":
                char_meet = x.args[0] if char_meet is None else cs_intersect(char_meet, x.args[0])
            else:
                members.add(x)
    if char_meet is not None:
        if not char_meet:
            return EMPTY
        members.add(chars(char_meet))
    if not members:
        return ANY
    if len(members) == 1:
        return next(iter(members))
    group = frozenset(members)
    return _term("and", (group,), all(m.nullable for m in group))


def negate(a: Node) -> Node:
    if a.kind == "not":
        return a.args[0]
    if a is ANY:
        return EMPTY
    return _term("not", (a,), not a.nullable)


def star(a: Node) -> Node:
    if a is EMPTY or a is EPS:
        return EPS
    if a.kind == "star":
        return a
    return _term("star", (a,), True)


ANY = _term("star", (_term("chars", (ALL,), False),), True)  # every string, the empty one too


def literal(text: str) -> Node:
    node = EPS
    for ch in reversed(text):
        node = cat(chars(((ord(ch), ord(ch)),)), node)
    return node


def derive(node: Node, ch: int) -> Node:
    """The Brzozowski derivative: the strings s such that chr(ch) + s is in the language."""
    cached = node.derivs.get(ch)
    if cached is not None:
        return cached
    kind = node.kind
    if kind == "chars":
        out = EPS if cs_contains(node.args[0], ch) else EMPTY
    elif kind == "cat":
        head, tail = node.args
        out = cat(derive(head, ch), tail)
        if head.nullable:
            out = alt((out, derive(tail, ch)))
    elif kind == "alt":
        out = alt(derive(x, ch) for x in node.args[0])
    elif kind == "and":
        out = both(derive(x, ch) for x in node.args[0])
    elif kind == "not":
        out = negate(derive(node.args[0], ch))
    elif kind == "star":
        out = cat(derive(node.args[0], ch), node)
    else:  # empty, eps
        out = EMPTY
    node.derivs[ch] = out
    return out


def _heads(node: Node, out: set[CharSet]) -> None:
    kind = node.kind
    if kind == "chars":
        out.add(node.args[0])
    elif kind == "cat":
        _heads(node.args[0], out)
        if node.args[0].nullable:
            _heads(node.args[1], out)
    elif kind in ("alt", "and"):
        for x in node.args[0]:
            _heads(x, out)
    elif kind in ("not", "star"):
        _heads(node.args[0], out)


def _classes(node: Node) -> list[CharSet]:
    """A partition of all characters whose members have the same derivative."""
    heads: set[CharSet] = set()
    _heads(node, heads)
    blocks: list[CharSet] = [ALL]
    for head in heads:
        outside = cs_complement(head)
        refined = []
        for block in blocks:
            for part in (cs_intersect(block, head), cs_intersect(block, outside)):
                if part:
                    refined.append(part)
        blocks = refined
    return blocks


def witness(node: Node, limit: int = STATE_LIMIT) -> str | None:
    """A shortest string in the language, or None when it is empty; Unknown when too big to tell."""
    seen = {node: ""}
    frontier = [node]
    while frontier:
        next_frontier = []
        for state in frontier:
            if state.nullable:
                return seen[state]
            for block in _classes(state):
                ch = block[0][0]
                after = derive(state, ch)
                if after is EMPTY or after in seen:
                    continue
                if len(seen) >= limit:
                    raise Unknown("too many states")
                seen[after] = seen[state] + chr(ch)
                next_frontier.append(after)
        frontier = next_frontier
    return None


def matches(node: Node, text: str) -> bool:
    """Whether the whole of `text` is in the language (tests check the parser against RE2 with it)."""
    for ch in text:
        node = derive(node, ord(ch))
        if node is EMPTY:
            return False
    return node.nullable


def is_empty(node: Node) -> bool:
    return witness(node) is None


# -- parsing the RE2 subset ---------------------------------------------------------------------------

_ESCAPES = {"a": 7, "f": 12, "t": 9, "n": 10, "r": 13, "v": 11}
_CLASS_ESCAPES = {
    "d": DIGIT,
    "D": cs_complement(DIGIT),
    "w": WORD,
    "W": cs_complement(WORD),
    "s": SPACE,
    "S": cs_complement(SPACE),
}
_REPEAT = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
MAX_REPEAT = 100  # a bigger count is expanded into too big a term: unknown instead


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def parse(self) -> Node:
        node = self.alternation()
        if self.i != len(self.p):
            raise Unknown(f"unexpected {self.p[self.i]!r}")
        return node

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return alt(branches)

    def concatenation(self) -> Node:
        parts: list[Node] = []
        while (ch := self.peek()) is not None and ch not in "|)":
            parts.append(self.repetition())
        node = EPS
        for part in reversed(parts):
            node = cat(part, node)
        return node

    def repetition(self) -> Node:
        atom = self.atom()
        quantified = False
        while (ch := self.peek()) is not None and ch in "*+?{":
            if quantified:
                raise Unknown("stacked repetition")
            if ch == "{":
                match = _REPEAT.match(self.p, self.i)
                if match is None:
                    raise Unknown("literal brace")  # RE2 reads it literally; not modelled
                low = int(match[1])
                high = low if match[2] is None else (int(match[3]) if match[3] else None)
                if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                    raise Unknown("repeat count too large")
                self.i = match.end()
                atom = _repeat(atom, low, high)
            else:
                self.i += 1
                atom = {"*": star(atom), "+": cat(atom, star(atom)), "?": alt((atom, EPS))}[ch]
            quantified = True
            if self.peek() == "?":  # lazy: the same language
                self.i += 1
        return atom

    def atom(self) -> Node:
        ch = self.p[self.i]
        if ch == "(":
            return self.group()
        if ch == "[":
            return chars(self.char_class())
        if ch == ".":
            self.i += 1
            return chars(ALL)  # the pattern runs as (?s:...): `.` matches newlines too
        if ch == "\\":
            return chars(self.escape())
        if ch in "^$*+?{":
            raise Unknown(f"{ch!r} here")
        self.i += 1
        return chars(((ord(ch), ord(ch)),))

    def group(self) -> Node:
        self.i += 1
        if self.p.startswith("?", self.i):
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith(("?P<", "?<"), self.i):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise Unknown("unterminated group name")
                self.i = end + 1
            else:
                raise Unknown("flags")
        node = self.alternation()
        if self.peek() != ")":
            raise Unknown("unbalanced group")
        self.i += 1
        return node

    def escape(self) -> CharSet:
        if self.i + 1 >= len(self.p):
            raise Unknown("trailing backslash")
        ch = self.p[self.i + 1]
        self.i += 2
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch in _ESCAPES:
            code = _ESCAPES[ch]
            return ((code, code),)
        if ch == "x":
            return self.hex_escape()
        if ch.isascii() and not ch.isalnum() and ch != "_":  # escaped punctuation is itself
            return ((ord(ch), ord(ch)),)
        raise Unknown(f"escape \\{ch}")

    def hex_escape(self) -> CharSet:
        if self.peek() == "{":
            end = self.p.find("}", self.i)
            digits = self.p[self.i + 1 : end] if end > 0 else ""
            self.i = end + 1
        else:
            digits = self.p[self.i : self.i + 2]
            self.i += 2
        try:
            code = int(digits, 16)
        except ValueError:
            raise Unknown("bad hex escape") from None
        if not digits or code > MAX_CHAR:
            raise Unknown("bad hex escape")
        return ((code, code),)

    def class_char(self) -> tuple[CharSet, int | None]:
        """One class item's characters, and its code point when it is a single one (for ranges)."""
        ch = self.p[self.i]
        if ch == "\\":
            s = self.escape()
            return s, (s[0][0] if len(s) == 1 and s[0][0] == s[0][1] else None)
        if ch == "[" and self.p.startswith("[:", self.i):
            raise Unknown("POSIX class")
        self.i += 1
        return ((ord(ch), ord(ch)),), ord(ch)

    def char_class(self) -> CharSet:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise Unknown("unterminated class")
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            items, low = self.class_char()
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                _, high = self.class_char()
                if low is None or high is None or low > high:
                    raise Unknown("bad range")
                ranges.append((low, high))
            else:
                ranges.extend(items)
        result = charset(ranges)
        return cs_complement(result) if negated else result


def _repeat(atom: Node, low: int, high: int | None) -> Node:
    node = EPS
    for _ in range(low):
        node = cat(node, atom)
    if high is None:
        return cat(node, star(atom))
    optional = EPS
    for _ in range(high - low):
        optional = alt((EPS, cat(atom, optional)))
    return cat(node, optional)


def parse_regex(pattern: str) -> Node:
    """The language of a relabel regex (fully anchored), or Unknown for constructs not modelled."""
    try:
        return _Parser(pattern).parse()
    except Unknown:
        raise
    except (IndexError, ValueError, RecursionError) as exc:
        raise Unknown(str(exc)) from None
