"""Render stage, part of it: the Ansible-style filters and tests of SPEC §10.

Installed by :func:`install` into the sandboxed environment that
``pipeline/render.py`` makes; imported only then (a run that renders
nothing never loads Jinja2, nor this). Each filter or test takes and
returns plain data — strings, numbers, lists, mappings, booleans — never a
module, a function or an object with ``__globals__``, so none opens a way
out of the sandbox; each one that can make a value larger than its input
(``to_json``, ``to_yaml``, ``regex_replace``, ``regex_findall``,
``b64encode``, ``comment``, ``flatten``) counts what it makes against the
sandbox's bounds (``max_file_size`` characters, ``range()``'s items)
before or while making it, never after.

Meaning: Ansible's (``ansible.plugins.filter.core``, ``mathstuff``,
``ansible.plugins.test.core``), checked against ansible-core itself on a
table of inputs (``tests/unit/test_filters_ansible.py``). The code is our
own (Ansible is GPL-3.0; this project is Apache-2.0 and ships its
dependencies), built on the standard library, PyYAML, Jinja2 and libpass
(``password_hash``). Where we differ on purpose, docs/spec.md §10 says so:
``union``/``intersect``/``difference`` keep first-seen order (Ansible's go
through a ``set``: their order changes from run to run, which would make a
file drift), ``password_hash`` without ``salt`` takes one derived from the
node and the template (stable output), ``ipaddr`` answers the common
queries with the standard library's ``ipaddress``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os.path
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any

# Bounds the sandbox gives us (render.py's _Bounds): each raises before a value
# beyond the bound is made.
Check = Callable[[int], None]


class FilterError(Exception):
    """A filter or test refused its input; the render names the template and line."""


def install(env: Any, *, chars: Check, items: Check, plain: Callable[[Any], Any]) -> None:
    """Add the filters and tests of SPEC §10 to the sandboxed environment ``env``.

    ``chars(n)`` / ``items(n)`` raise before a string of ``n`` characters or a
    list of ``n`` items beyond the sandbox's bounds is made; ``plain(value)``
    gives ``value`` with every ``!age`` value in it read as its plaintext (the
    read is recorded: a destination whose template passes a secret through a
    filter is secret, SPEC §8). Jinja2's own filters keep their meaning
    (Ansible's ``default`` is Jinja2's); ``unique`` is Ansible's, which is
    Jinja2's called as Ansible calls it (case-insensitive unless
    ``case_sensitive=true``; unhashable items compared one by one).
    """
    import jinja2
    from jinja2.filters import do_unique

    def opened(func: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            return func(*(plain(a) for a in args), **{k: plain(v) for k, v in kwargs.items()})

        run.__name__ = func.__name__
        run.__doc__ = func.__doc__
        return run

    def to_json(a: Any, **kwargs: Any) -> str:
        return _bounded_json(a, chars, kwargs)

    def to_nice_json(a: Any, indent: int = 4, sort_keys: bool = True, **kwargs: Any) -> str:
        kwargs.pop("separators", None)
        kwargs.update(indent=indent, sort_keys=sort_keys, separators=(",", ": "))
        return _bounded_json(a, chars, kwargs)

    def to_yaml(a: Any, *_: Any, default_flow_style: bool | None = None, **kwargs: Any) -> str:
        return _bounded_yaml(a, chars, dict(kwargs, default_flow_style=default_flow_style))

    def to_nice_yaml(
        a: Any, indent: int = 4, *_: Any, default_flow_style: bool = False, **kwargs: Any
    ) -> str:
        kwargs.update(indent=indent, default_flow_style=default_flow_style)
        return _bounded_yaml(a, chars, kwargs)

    def regex_replace(
        value: Any = "",
        pattern: str = "",
        replacement: str = "",
        ignorecase: bool = False,
        multiline: bool = False,
        count: int = 0,
        mandatory_count: int = 0,
    ) -> str:
        return _regex_replace(
            _text(value),
            pattern,
            replacement,
            _flags(ignorecase, multiline),
            count,
            mandatory_count,
            chars,
        )

    def regex_findall(
        value: Any, regex: str, multiline: bool = False, ignorecase: bool = False
    ) -> list[Any]:
        return _regex_findall(_text(value), regex, _flags(ignorecase, multiline), chars, items)

    def b64encode(string: Any, encoding: str = "utf-8", urlsafe: bool = False) -> str:
        data = _text(string).encode(encoding, errors="surrogateescape")
        chars(4 * ((len(data) + 2) // 3))
        encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
        return encode(data).decode("ascii")

    def comment(text: Any, style: str = "plain", **kw: Any) -> str:
        return _comment(_text(text), style, kw, chars)

    def flatten(mylist: Any, levels: int | None = None, skip_nulls: bool = True) -> list[Any]:
        out: list[Any] = []
        _flatten(mylist, levels, skip_nulls, out, items)
        return out

    @jinja2.pass_environment
    def unique(
        environment: Any, a: Any, case_sensitive: bool | None = None, attribute: Any = None
    ) -> list[Any]:
        a = plain(a)
        try:
            return list(
                do_unique(environment, a, case_sensitive=bool(case_sensitive), attribute=attribute)
            )
        except TypeError:  # unhashable items (mappings): Ansible's own first-seen loop
            if case_sensitive is False or attribute:
                raise FilterError(
                    "unique cannot compare these items with case_sensitive=false or attribute"
                ) from None
            return _first_seen(a)

    @jinja2.pass_context
    def password_hash(
        context: Any,
        password: Any,
        hashtype: str = "sha512",
        salt: str | None = None,
        salt_size: int | None = None,
        rounds: int | None = None,
        ident: str | None = None,
    ) -> str:
        if not salt and not salt_size:
            salt = _derived_salt(context, hashtype)
        return _password_hash(_text(plain(password)), hashtype, salt, salt_size, rounds, ident)

    @jinja2.pass_context
    def mandatory(context: Any, a: Any, msg: str | None = None) -> Any:
        if isinstance(a, jinja2.Undefined):
            if msg is not None:
                raise FilterError(str(msg))
            name = getattr(a, "_undefined_name", None)
            raise FilterError(f"Mandatory variable {f'{name!r} ' if name else ''}not defined.")
        return a

    env.filters.update(
        {
            "bool": opened(to_bool),
            "ternary": ternary,
            "to_json": opened(to_json),
            "to_nice_json": opened(to_nice_json),
            "to_yaml": opened(to_yaml),
            "to_nice_yaml": opened(to_nice_yaml),
            "from_json": opened(from_json),
            "from_yaml": opened(from_yaml),
            "regex_replace": opened(regex_replace),
            "regex_search": opened(regex_search),
            "regex_findall": opened(regex_findall),
            "b64encode": opened(b64encode),
            "b64decode": opened(b64decode),
            "hash": opened(get_hash),
            "comment": opened(comment),
            "combine": opened(combine),
            "dict2items": opened(dict2items),
            "items2dict": opened(items2dict),
            "mandatory": mandatory,
            "quote": opened(quote),
            "unique": unique,
            "union": opened(union),
            "difference": opened(difference),
            "intersect": opened(intersect),
            "flatten": opened(flatten),
            "basename": opened(basename),
            "dirname": opened(dirname),
            "password_hash": password_hash,
            "ipaddr": opened(ipaddr),
        }
    )
    env.tests["version"] = opened(version_compare)
    env.tests["version_compare"] = env.tests["version"]  # Ansible's older name


# ---------------------------------------------------------------- text


def _text(value: Any) -> str:
    """A filter's text argument, as Ansible's ``to_text(nonstring='simplerepr')``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def quote(a: Any) -> str:
    """``a`` quoted for a POSIX shell (``shlex.quote``); None is ``''``."""
    return shlex.quote("" if a is None else _text(a))


def basename(path: Any) -> str:
    """The last component of a path (``os.path.basename``)."""
    return os.path.basename(_text(path))


def dirname(path: Any) -> str:
    """A path without its last component (``os.path.dirname``)."""
    return os.path.dirname(_text(path))


_TRUE = {"yes", "on", "true", "1"}
_FALSE = {"no", "off", "false", "0"}


def to_bool(value: Any) -> bool:
    """Ansible's ``bool``: yes/on/true/1 (any case, or the int/bool) → True; no/off/false/0 →
    False; anything else is what Ansible 2.19 still does (== 1) — a deprecated coercion there."""
    check: Any = value.lower() if isinstance(value, str) else value
    if isinstance(value, int):
        check = str(value).lower()
    try:
        if check in _TRUE:
            return True
        if check in _FALSE:
            return False
        return bool(check == 1)
    except TypeError:
        return False


def ternary(value: Any, true_val: Any, false_val: Any, none_val: Any = None) -> Any:
    """``true_val`` when ``value`` is truthy, else ``false_val``; ``none_val`` (if given) for None."""
    if value is None and none_val is not None:
        return none_val
    return true_val if value else false_val


def get_hash(data: Any, hashtype: str = "sha1") -> str:
    """The hex digest of ``data`` (UTF-8) with ``hashlib``'s ``hashtype``."""
    try:
        h = hashlib.new(hashtype)
    except (ValueError, TypeError) as exc:
        raise FilterError(f"hash: {exc}") from None
    h.update(_text(data).encode("utf-8", errors="surrogateescape"))
    return h.hexdigest()


def b64decode(string: Any, encoding: str = "utf-8", urlsafe: bool = False) -> str:
    """Base64 ``string`` decoded, as text in ``encoding`` (never larger than its input)."""
    data = _text(string).encode("utf-8", errors="surrogateescape")
    decode = base64.urlsafe_b64decode if urlsafe else base64.b64decode
    try:
        return decode(data).decode(encoding, errors="surrogateescape")
    except ValueError as exc:
        raise FilterError(f"b64decode: {exc}") from None


# ---------------------------------------------------------------- data


def _plain_data(value: Any) -> Any:
    """Mappings and sequences of a context as dict and list (what JSON and YAML dump).

    An undefined value inside (another node's ``!age`` value from ``nodes()``,
    which stays unreadable) fails as reading it anywhere does, naming it."""
    from jinja2 import Undefined

    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, Mapping):
        return {k: _plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_data(v) for v in value]
    return value


class _Counted:
    """A text stream that refuses to grow past a bound, a write at a time."""

    def __init__(self, chars: Check) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.check = chars

    def write(self, text: str) -> None:
        self.size += len(text)
        self.check(self.size)
        self.parts.append(text)


def _bounded_json(a: Any, chars: Check, kwargs: dict[str, Any]) -> str:
    """``json.dumps(a, **kwargs)`` with its output counted chunk by chunk: a list holding one
    large string a hundred thousand times must fail at the bound, not after it."""
    indent = kwargs.get("indent")
    if isinstance(indent, int) and not isinstance(indent, bool):
        # json makes ' ' * indent in one C call, before any chunk can be counted.
        chars(indent)
    try:
        encoder = json.JSONEncoder(**kwargs)
    except TypeError as exc:
        raise FilterError(f"to_json: {exc}") from None
    out = _Counted(chars)
    for chunk in encoder.iterencode(_plain_data(a)):
        out.write(chunk)
    return "".join(out.parts)


def _bounded_yaml(a: Any, chars: Check, kwargs: dict[str, Any]) -> str:
    """``yaml.safe_dump(a, allow_unicode=True, **kwargs)`` into a stream counted write by write.

    SafeDumper where Ansible uses its AnsibleDumper: the same output for plain
    data, and no Python object tags."""
    import yaml

    out = _Counted(chars)
    try:
        yaml.dump(
            _plain_data(a),
            out,
            Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
            allow_unicode=True,
            **kwargs,
        )
    except yaml.representer.RepresenterError as exc:
        raise FilterError(f"to_yaml: {exc}") from None
    return "".join(out.parts)


def from_json(a: Any, **kwargs: Any) -> Any:
    """The value of a JSON text."""
    try:
        return json.loads(a, **kwargs)
    except (ValueError, TypeError) as exc:
        raise FilterError(f"from_json: {exc}") from None


def from_yaml(data: Any) -> Any:
    """The value of a YAML text (PyYAML's safe loader: no Python object tags); None stays
    None, a non-string passes through (Ansible's behaviour, deprecated there)."""
    if data is None or not isinstance(data, str):
        return data
    import yaml

    try:
        return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1} of its text)" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FilterError(f"from_yaml: invalid YAML{at}: {problem}") from None


def combine(*terms: Any, recursive: bool = False, list_merge: str = "replace") -> dict[Any, Any]:
    """Mappings merged left to right, the later winning (Ansible's ``combine``).

    ``recursive``: merge nested mappings; ``list_merge``: ``replace`` (default),
    ``keep``, ``append``, ``prepend``, ``append_rp``, ``prepend_rp`` for two lists
    under one key. ``[a, b] | combine`` is ``a | combine(b)``."""
    if list_merge not in _LIST_MERGES:
        raise FilterError(f"combine: list_merge must be one of {', '.join(_LIST_MERGES)}")
    dicts: list[Any] = []
    for term in terms:
        dicts.extend(term if isinstance(term, list | tuple) else [term])
    for d in dicts:
        if not isinstance(d, Mapping):
            raise FilterError(f"combine: {type(d).__name__} is not a mapping")
    if not dicts:
        return {}
    result = dict(dicts[0])
    for d in dicts[1:]:
        result = _merge(result, d, recursive, list_merge)
    return result


_LIST_MERGES = ("replace", "keep", "append", "prepend", "append_rp", "prepend_rp")


def _merge(
    x: Mapping[Any, Any], y: Mapping[Any, Any], recursive: bool, mode: str
) -> dict[Any, Any]:
    out = dict(x)
    for key, yv in y.items():
        if key not in out:
            out[key] = yv
            continue
        xv = out[key]
        if isinstance(xv, Mapping) and isinstance(yv, Mapping):
            out[key] = _merge(xv, yv, recursive, mode) if recursive else yv
        elif isinstance(xv, list) and isinstance(yv, list):
            if mode == "replace":
                out[key] = yv
            elif mode == "append":
                out[key] = xv + yv
            elif mode == "prepend":
                out[key] = yv + xv
            elif mode == "append_rp":
                out[key] = [z for z in xv if z not in yv] + yv
            elif mode == "prepend_rp":
                out[key] = yv + [z for z in xv if z not in yv]
            # keep: x's list stays
        else:
            out[key] = yv
    return out


def dict2items(mydict: Any, key_name: str = "key", value_name: str = "value") -> list[Any]:
    """A mapping as a list of ``{key_name: k, value_name: v}``."""
    if not isinstance(mydict, Mapping):
        raise FilterError(f"dict2items requires a mapping, got {type(mydict).__name__}")
    return [{key_name: k, value_name: v} for k, v in mydict.items()]


def items2dict(mylist: Any, key_name: str = "key", value_name: str = "value") -> dict[Any, Any]:
    """The reverse of :func:`dict2items`."""
    if not isinstance(mylist, list | tuple):
        raise FilterError(f"items2dict requires a list, got {type(mylist).__name__}")
    try:
        return {item[key_name]: item[value_name] for item in mylist}
    except (KeyError, TypeError):
        raise FilterError(
            f"items2dict requires each item to be a mapping with {key_name!r} and {value_name!r}"
        ) from None


def _first_seen(a: Any) -> list[Any]:
    out: list[Any] = []
    for x in a:
        if x not in out:
            out.append(x)
    return out


def union(a: Any, b: Any) -> list[Any]:
    """Items of ``a`` then of ``b``, each once, in first-seen order."""
    return _first_seen([*a, *b])


def intersect(a: Any, b: Any) -> list[Any]:
    """Items of ``a`` also in ``b``, each once, in ``a``'s order."""
    b = list(b)
    return _first_seen([x for x in a if x in b])


def difference(a: Any, b: Any) -> list[Any]:
    """Items of ``a`` not in ``b``, each once, in ``a``'s order."""
    b = list(b)
    return _first_seen([x for x in a if x not in b])


def _flatten(
    mylist: Any, levels: int | None, skip_nulls: bool, out: list[Any], items: Check
) -> None:
    for element in mylist:
        if skip_nulls and element in (None, "None", "null"):
            continue
        if isinstance(element, list | tuple) and (levels is None or levels >= 1):
            _flatten(element, None if levels is None else int(levels) - 1, skip_nulls, out, items)
        else:
            out.append(element)
            items(len(out))


# ---------------------------------------------------------------- regular expressions


def _flags(ignorecase: Any, multiline: Any) -> int:
    return (re.I if ignorecase else 0) | (re.M if multiline else 0)


def _compile(pattern: Any, flags: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except (re.error, TypeError) as exc:
        raise FilterError(f"invalid regular expression {pattern!r}: {exc}") from None


_GROUP_REFS = re.compile(r"\\(?:\d|g<)")  # what re's expand() reads as a group: \1, \g<name>


def _regex_replace(
    value: str,
    pattern: str,
    replacement: str,
    flags: int,
    count: int,
    mandatory_count: int,
    chars: Check,
) -> str:
    """``re.subn`` made one match at a time, its output counted against the bound."""
    regex = _compile(pattern, flags)
    parts: list[str] = []
    size = 0
    end = 0
    subs = 0
    # expand() makes a match's text in one C call: 32,000 "\1" of a 65,000-character
    # group are 2 GB before it could be counted. Each group reference is counted at
    # the longest group of the match first (an escaped backslash counts too: a bound).
    refs = len(_GROUP_REFS.findall(replacement)) if isinstance(replacement, str) else 0
    for match in regex.finditer(value):
        if count and subs >= count:
            break
        if refs:
            longest = max([len(match.group()), *(len(g) for g in match.groups(default=""))])
            chars(size + match.start() - end + len(replacement) + refs * longest)
        try:
            new = match.expand(replacement)
        except (re.error, IndexError) as exc:
            raise FilterError(f"invalid replacement {replacement!r}: {exc}") from None
        size += match.start() - end + len(new)
        chars(size)
        parts += (value[end : match.start()], new)
        end = match.end()
        subs += 1
    chars(size + len(value) - end)
    parts.append(value[end:])
    if mandatory_count and mandatory_count != subs:
        raise FilterError(
            f"{pattern!r} should match {mandatory_count} times, but matches {subs} times"
        )
    return "".join(parts)


def _regex_findall(value: str, regex: str, flags: int, chars: Check, items: Check) -> list[Any]:
    """``re.findall`` made one match at a time: every match may hold the rest of the text
    (``(?=(.*))``), so the total is counted against the bound."""
    compiled = _compile(regex, flags)
    out: list[Any] = []
    size = 0
    for match in compiled.finditer(value):
        if compiled.groups == 0:
            found: Any = match.group()
            size += len(found)
        else:
            groups = match.groups(default="")
            size += sum(len(g) for g in groups)
            found = groups[0] if compiled.groups == 1 else groups
        chars(size)
        out.append(found)
        items(len(out))
    return out


def regex_search(value: Any, regex: str, *args: str, **kwargs: Any) -> Any:
    """The first match of ``regex`` (or, with ``'\\1'``/``'\\g<name>'`` arguments, the list of
    those groups); None when there is none."""
    groups: list[int | str] = []
    for arg in args:
        named = re.match(r"\\g<(\S+)>", str(arg))
        numbered = re.match(r"\\(\d+)", str(arg))
        if named:
            groups.append(named.group(1))
        elif numbered:
            groups.append(int(numbered.group(1)))
        else:
            raise FilterError(f"regex_search: unknown argument {arg!r}")
    match = _compile(regex, _flags(kwargs.get("ignorecase"), kwargs.get("multiline"))).search(
        _text(value)
    )
    if not match:
        return None
    if not groups:
        return match.group()
    return [match.group(g) for g in groups]


# ---------------------------------------------------------------- comment


_COMMENT_STYLES: dict[str, dict[str, str]] = {
    "plain": {"decoration": "# "},
    "erlang": {"decoration": "% "},
    "c": {"decoration": "// "},
    "cblock": {"beginning": "/*", "decoration": " * ", "end": " */"},
    "xml": {"beginning": "<!--", "decoration": " - ", "end": "-->"},
}


def _comment(text: str, style: str, kw: Mapping[str, Any], chars: Check) -> str:
    """Ansible's ``comment``: ``text`` as a comment block of ``style`` (plain, erlang, c,
    cblock, xml), each part overridable (beginning, prefix, prefix_count, decoration,
    postfix, postfix_count, end, newline). The size is checked before it is built."""
    if style not in _COMMENT_STYLES:
        raise FilterError(f"comment: invalid style {style!r} (one of {', '.join(_COMMENT_STYLES)})")
    params = _COMMENT_STYLES[style]
    edge = str(kw.get("decoration", params["decoration"])).rstrip()
    p: dict[str, Any] = {
        "newline": "\n",
        "beginning": "",
        "prefix": edge,
        "prefix_count": 1,
        "decoration": "",
        "postfix": edge,
        "postfix_count": 1,
        "end": "",
    }
    p.update(params)
    p.update(kw)
    nl, deco = str(p["newline"]), str(p["decoration"])
    prefix_count, postfix_count = int(p["prefix_count"]), int(p["postfix_count"])
    prefix, postfix = str(p["prefix"]), str(p["postfix"])
    lines = text.count(nl) + 1 if nl else 1
    chars(
        len(str(p["beginning"]))
        + len(str(p["end"]))
        + 2 * len(nl)
        + max(prefix_count, 0) * (len(prefix) + len(nl))
        + max(postfix_count, 0) * (len(postfix) + len(nl))
        + len(text)
        + lines * (len(deco) + len(nl))
    )
    beginning = f"{p['beginning']}{nl}" if p["beginning"] else ""
    head = ""
    if prefix:
        head = (f"{prefix}{nl}" if prefix != nl else nl) * prefix_count
    body = (deco + text.replace(nl, nl + deco)).replace(deco + nl, deco.rstrip() + nl)
    # nl.join(["", *[postfix] * postfix_count]) without the list: empty parts are
    # counted as 0 characters above, but a list of 10**9 of them is gigabytes.
    tail = (nl + postfix) * postfix_count
    end = f"{nl}{p['end']}" if p["end"] else ""
    return f"{beginning}{head}{body}{tail}{end}"


# ---------------------------------------------------------------- password_hash


_HASHES = {"md5": "md5_crypt", "sha256": "sha256_crypt", "sha512": "sha512_crypt"}
# The rounds Ansible 2.19 passes to passlib when none are given (its BaseHash.algorithms):
# the same hash for the same salt as Ansible's, at ~0.5 s a hash (pure Python).
_IMPLICIT_ROUNDS = {"sha256_crypt": 535000, "sha512_crypt": 656000}
_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _derived_salt(context: Any, hashtype: str) -> str:
    """16 salt characters from the node's name and the template's path (SPEC §10: stable
    output, so a rendered /etc/shadow line does not change on every run)."""
    node = context.get("node")
    name = node.get("name", "") if isinstance(node, Mapping) else ""
    digest = hashlib.sha256(f"{name}\0{context.name}\0{hashtype}".encode()).digest()
    size = 8 if hashtype == "md5" else 16  # md5_crypt takes at most 8
    return "".join(_SALT_CHARS[b % 64] for b in digest[:size])


def _password_hash(
    password: str,
    hashtype: str,
    salt: str | None,
    salt_size: int | None,
    rounds: int | None,
    ident: str | None,
) -> str:
    """crypt(3)-style hash of ``password`` with libpass (passlib's maintained fork), as
    Ansible's ``password_hash`` calls passlib: ``sha512`` (default), ``sha256``, ``md5``."""
    scheme = _HASHES.get(hashtype, hashtype)
    if scheme not in _HASHES.values():
        raise FilterError(
            f"password_hash: {hashtype!r} is not supported (one of {', '.join(_HASHES)})"
        )
    from passlib import hash as passlib_hash

    settings: dict[str, Any] = {}
    if salt:
        settings["salt"] = salt
    if salt_size:
        settings["salt_size"] = int(salt_size)
    chosen = rounds or _IMPLICIT_ROUNDS.get(scheme)
    if chosen:
        settings["rounds"] = int(chosen)
    try:
        return str(getattr(passlib_hash, scheme).using(**settings).hash(password))
    except (ValueError, TypeError) as exc:
        raise FilterError(f"password_hash: {exc}") from None


# ---------------------------------------------------------------- ipaddr


def ipaddr(value: Any, query: str = "") -> Any:
    """The ``ipaddr`` filter's common queries, with the standard library's ``ipaddress``.

    ``value``: an address, ``address/prefix`` or a list of them (a list keeps
    the items for which the query gives something). No query: the value when
    it is a valid address or network, else False. Queries: ``address``,
    ``network``, ``netmask``, ``hostmask``, ``broadcast``, ``prefix``,
    ``size``, ``host``, ``net``, ``ipv4``, ``ipv6``, ``version``,
    ``private``, ``public``, ``loopback``, ``revdns``, an integer (the N-th
    address of the network, as ``address/prefix``). Anything else is an error
    naming it.
    """
    if isinstance(value, list | tuple):
        results = [ipaddr(v, query) for v in value]
        return [r for r in results if r not in (False, None, "")]
    return _ipaddr_one(value, str(query))


def _ipaddr_one(value: Any, query: str) -> Any:
    if isinstance(value, bool) or value is None:
        return False
    try:
        if isinstance(value, int):
            iface = ipaddress.ip_interface(value)
        else:
            iface = ipaddress.ip_interface(str(value).strip())
    except ValueError:
        return False
    net = iface.network
    single = str(value).find("/") < 0
    host_bits = iface.ip != net.network_address or net.prefixlen == net.max_prefixlen
    plain = str(iface.ip) if single else str(iface.with_prefixlen)
    if query == "":
        return plain
    if query == "address":
        return str(iface.ip) if single or host_bits else False
    if query == "network":
        return str(net.network_address)
    if query == "net":
        return str(net) if not host_bits or net.prefixlen == net.max_prefixlen else False
    if query == "host":
        return str(iface.with_prefixlen) if host_bits else False
    if query == "netmask":
        return str(net.netmask)
    if query == "hostmask":
        return str(net.hostmask)
    if query == "broadcast":
        return str(net.broadcast_address) if net.version == 4 and net.prefixlen < 31 else None
    if query == "prefix":
        return net.prefixlen
    if query == "size":
        return net.num_addresses
    if query == "version":
        return net.version
    if query in ("ipv4", "ipv6"):
        return plain if net.version == int(query[-1]) else False
    if query == "private":
        # Python counts ::1 and 127/8 private; ansible.utils (netaddr) does not.
        return plain if iface.ip.is_private and not iface.ip.is_loopback else False
    if query == "public":
        return plain if iface.ip.is_global else False
    if query == "loopback":
        return plain if iface.ip.is_loopback else False
    if query == "revdns":
        return iface.ip.reverse_pointer + "."
    if re.fullmatch(r"-?\d+", query):
        n = int(query)
        if not -net.num_addresses <= n < net.num_addresses:
            return False
        address = net[n]
        return f"{address}/{net.prefixlen}"
    raise FilterError(f"ipaddr: unknown query {query!r}")


# ---------------------------------------------------------------- version


_OPERATORS = {
    "==": "eq",
    "=": "eq",
    "eq": "eq",
    "<": "lt",
    "lt": "lt",
    "<=": "le",
    "le": "le",
    ">": "gt",
    "gt": "gt",
    ">=": "ge",
    "ge": "ge",
    "!=": "ne",
    "<>": "ne",
    "ne": "ne",
}
_LOOSE = re.compile(r"(\d+|[a-z]+|\.)", re.I)
_STRICT = re.compile(r"^(\d+)\.(\d+)(\.(\d+))?([ab](\d+))?$", re.ASCII)


def _loose(text: str) -> list[int | str]:
    """distutils' LooseVersion (Ansible's default ``version_type``): numbers and words."""
    out: list[int | str] = []
    for part in _LOOSE.split(text):
        if part and part != ".":
            out.append(int(part) if part.isdigit() else part)
    return out


def _strict(text: str) -> tuple[tuple[int, int, int], tuple[str, int] | tuple[str]]:
    """distutils' StrictVersion: N.N[.N][(a|b)N]; a pre-release sorts before the release."""
    m = _STRICT.match(text)
    if not m:
        raise FilterError(f"invalid version number {text!r}")
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(4) or 0)
    pre: tuple[str, int] | tuple[str] = (m.group(5)[0], int(m.group(6))) if m.group(5) else ("~",)
    return (major, minor, patch), pre


def version_compare(
    value: Any,
    version: Any,
    operator: str = "eq",
    strict: bool | None = None,
    version_type: str | None = None,
) -> bool:
    """Ansible's ``version`` test: ``value OPERATOR version`` as ``loose`` (default) or
    ``strict`` versions (distutils' rules). Other version types are an error naming them."""
    if strict is not None and version_type is not None:
        raise FilterError("version: cannot give both 'strict' and 'version_type'")
    if not value:
        raise FilterError("version: the value to compare cannot be empty")
    if not version:
        raise FilterError("version: the version to compare against cannot be empty")
    kind = "strict" if strict else (version_type or "loose")
    if kind not in ("loose", "strict"):
        raise FilterError(f"version: version_type {kind!r} is not supported (loose, strict)")
    if operator not in _OPERATORS:
        raise FilterError(
            f"version: invalid operator {operator!r} (one of {', '.join(_OPERATORS)})"
        )
    parse: Callable[[str], Any] = _strict if kind == "strict" else _loose
    left, right = parse(_text(value)), parse(_text(version))
    import operator as op

    try:
        return bool(getattr(op, _OPERATORS[operator])(left, right))
    except TypeError as exc:
        raise FilterError(f"version comparison failed: {exc}") from None
