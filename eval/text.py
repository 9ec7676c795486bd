"""Natural text for `vllm-dash distill` and the attention-recall metric: Python's own
standard-library documentation (the docstrings of a fixed list of stdlib modules).

Why this text: it is real prose and code-like English that ships with every Python, needs
no download, is deterministic for a given Python version, and no evaluation task uses it
(the harness's haystacks are eval/tasks.py's generated noise sentences and word lists).

Two disjoint slices: every module of :data:`STDLIB_MODULES` belongs to exactly one of
``"distill"`` (the text the pooling vectors are fitted on) and ``"recall"`` (the held-out
text attention recall is measured on). The split is fixed (by a hash of the module name,
independent of any seed), so no seed can make recall score the distill text. Within a
slice, ``seed`` picks the order of the modules and so which text each window holds.

A module's text is its docstring, then ``module.name`` and the docstring of each public
class and function defined in it (and of the methods defined in each such class), names
in sorted order. Only docstrings are used (no signatures or reprs, which can hold memory
addresses), so the text is the same in every run of one Python version.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import sys
import warnings
from typing import Optional

__all__ = ["PARTS", "STDLIB_MODULES", "slice_modules", "module_text", "slice_text",
           "token_windows", "cut_windows", "describe"]

#: The two disjoint slices.
PARTS = ("distill", "recall")

#: Stdlib modules whose docstrings make the text (importing them has no side effects).
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect",
    "calendar", "codecs", "collections", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "logging.handlers", "lzma", "mailbox",
    "mimetypes", "multiprocessing.pool", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport",
)


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"text part={part!r} is invalid: must be one of {list(PARTS)}")


def slice_modules(part: str) -> list[str]:
    """The modules of one slice, sorted. Fixed split: a module's slice is the parity of
    the first byte of sha256("vllm-dash-text/" + name), so the slices never overlap."""
    _check_part(part)
    want = PARTS.index(part)
    return sorted(m for m in STDLIB_MODULES
                  if hashlib.sha256(f"vllm-dash-text/{m}".encode()).digest()[0] % 2 == want)


def _doc(obj) -> Optional[str]:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc and doc.strip() else None


def module_text(name: str) -> str:
    """Docstrings of one stdlib module (see the module docstring); "" if it does not
    import in this Python."""
    with warnings.catch_warnings():      # deprecated aliases (typing.re, ...) warn on access
        warnings.simplefilter("ignore")
        return _module_text(name)


def _module_text(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return ""
    parts = [f"{name}\n{_doc(mod) or ''}"]
    for attr in sorted(vars(mod)):
        obj = vars(mod)[attr]
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue                                   # re-exported from elsewhere
        doc = _doc(obj)
        if doc:
            parts.append(f"{name}.{attr}\n{doc}")
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                fn = vars(obj)[meth]
                if meth.startswith("_") or not inspect.isfunction(fn):
                    continue
                doc = _doc(fn)
                if doc:
                    parts.append(f"{name}.{attr}.{meth}\n{doc}")
    return "\n\n".join(parts)


def slice_text(part: str, seed: int) -> list[str]:
    """The slice's module texts in the order ``seed`` picks."""
    names = slice_modules(part)
    random.Random(f"vllm-dash-text/{part}/{seed}").shuffle(names)
    return [t for t in (module_text(n) for n in names) if t]


def token_windows(tokenizer, part: str, length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of exactly ``length`` token ids of the slice's text (see
    :func:`cut_windows`)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"window count={count!r} is invalid: must be an integer >= 1")
    return cut_windows(tokenizer, part, [length] * count, seed)


def cut_windows(tokenizer, part: str, lengths, seed: int) -> list[list[int]]:
    """One window per entry of ``lengths`` (token ids, exactly that many).

    Each window starts with the tokenizer's BOS token (when it has one) followed by
    consecutive text; the windows are cut one after another from the slice's text in the
    order ``seed`` picks, so they do not overlap while the slice lasts (after that the
    text is reused in another order: a window may then repeat text of an earlier one).
    """
    lengths = list(lengths)
    for length in lengths:
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"window length={length!r} is invalid: must be an integer >= 2")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if bos is not None else []
    bodies = [n - len(head) for n in lengths]
    stream: list[int] = []
    rounds = 0
    while len(stream) < sum(bodies):
        text = "\n\n".join(slice_text(part, seed + 7919 * rounds))
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        rounds += 1
        if rounds > 64:
            raise RuntimeError("the stdlib text slice is empty in this Python")
    out, at = [], 0
    for n in bodies:
        out.append(head + stream[at:at + n])
        at += n
    return out


def describe(part: str, seed: int) -> str:
    """One line for a file's metadata: what text, which slice, which seed."""
    _check_part(part)
    v = sys.version_info
    return (f"python {v.major}.{v.minor} stdlib docstrings (eval/text.py), slice {part!r} "
            f"({len(slice_modules(part))} modules), seed {seed}")
