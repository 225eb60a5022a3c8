"""GLUE-style text classification tasks built offline from the standard library's docstrings.

The corpus is the prose of the docstrings (module, class, function and method) of a fixed
list of standard-library modules, grouped into six topics. Paragraphs holding code
(doctests, indented blocks, ``::`` literals) or lists are dropped; the rest is split into
sentences; a sentence seen before is dropped. Modules and attributes are walked in sorted
order, so the corpus is the same on every run of one Python version; other versions
differ slightly (docstrings get edited, modules come and go: a module that fails to import
is skipped).

Docstrings (not sentences) are split into train/val/test by a seeded shuffle, so no
sentence or sentence pair crosses splits, and every task draws its examples from its
split's docstrings only. Labels are balanced in every split.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise

#: Topic -> standard-library modules (where their members are defined).
TOPICS: dict[str, tuple[str, ...]] = {
    "text": (
        "base64", "binascii", "codecs", "configparser", "csv", "difflib", "encodings.idna",
        "encodings.punycode", "gettext", "html", "html.parser", "json", "json.decoder",
        "json.encoder", "keyword", "locale", "pprint", "quopri", "re", "reprlib", "shlex",
        "string", "stringprep", "struct", "textwrap", "tokenize", "tomllib", "unicodedata",
        "xml.dom.expatbuilder", "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree",
        "xml.sax.expatreader", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    ),
    "data": (
        "abc", "array", "bisect", "builtins", "calendar", "cmath", "collections",
        "collections.abc", "colorsys", "contextvars", "copy", "copyreg", "dataclasses",
        "datetime", "decimal", "enum", "fractions", "functools", "graphlib", "hashlib",
        "heapq", "hmac", "itertools", "math", "numbers", "operator", "random", "secrets",
        "statistics", "time", "types", "typing", "weakref", "zoneinfo",
    ),
    "files": (
        "_pyio", "bz2", "compileall", "dbm", "dbm.dumb", "filecmp", "fileinput", "fnmatch",
        "getpass", "glob", "gzip", "io", "linecache", "lzma", "mailbox", "mmap", "netrc", "os",
        "pathlib", "pickle", "pickletools", "platform", "plistlib", "posixpath", "py_compile",
        "shelve", "shutil", "sqlite3", "stat", "sysconfig", "tabnanny", "tarfile", "tempfile",
        "wave", "zipapp", "zipfile", "zipimport", "zlib",
    ),
    "net": (
        "email._header_value_parser", "email._policybase", "email.charset",
        "email.contentmanager", "email.feedparser", "email.generator", "email.header",
        "email.headerregistry", "email.iterators", "email.message", "email.mime.multipart",
        "email.mime.text", "email.parser", "email.policy", "email.utils", "ftplib",
        "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
        "ipaddress", "mimetypes", "poplib", "smtplib", "socket", "socketserver", "ssl",
        "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
        "urllib.robotparser", "uuid", "webbrowser", "wsgiref.handlers", "wsgiref.headers",
        "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xmlrpc.client",
        "xmlrpc.server",
    ),
    "concurrency": (
        "_threading_local", "asyncio.base_events", "asyncio.events", "asyncio.futures",
        "asyncio.locks", "asyncio.protocols", "asyncio.queues", "asyncio.runners",
        "asyncio.selector_events", "asyncio.sslproto", "asyncio.streams", "asyncio.subprocess",
        "asyncio.taskgroups", "asyncio.tasks", "asyncio.timeouts", "asyncio.transports",
        "asyncio.unix_events", "concurrent.futures._base", "concurrent.futures.process",
        "concurrent.futures.thread", "multiprocessing.connection", "multiprocessing.context",
        "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
        "multiprocessing.queues", "multiprocessing.shared_memory",
        "multiprocessing.synchronize", "queue", "sched", "selectors", "signal", "subprocess",
        "threading",
    ),
    "devtools": (
        "argparse", "ast", "atexit", "bdb", "cProfile", "cmd", "code", "codeop", "contextlib",
        "dis", "doctest", "faulthandler", "gc", "getopt", "importlib", "importlib.abc",
        "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.util",
        "inspect", "logging", "logging.config", "logging.handlers", "modulefinder", "optparse",
        "pdb", "pkgutil", "profile", "pstats", "pyclbr", "pydoc", "rlcompleter", "runpy",
        "site", "symtable", "sys", "timeit", "trace", "traceback", "tracemalloc",
        "unittest.case", "unittest.loader", "unittest.mock", "unittest.result",
        "unittest.runner", "unittest.suite", "warnings",
    ),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
SPLITS = ("train", "val", "test")
#: Fractions of the corpus's sentences in each split.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
#: Examples per split (train, val, test) at most; fewer when a split's data runs out.
FULL_SIZES = (4000, 200, 400)
TINY_SIZES = (1000, 200, 300)

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'\]][.!?])\s+(?=[A-Z])")
_LIST_ITEM = re.compile(r"\s*([-*+]|\d+[.)])\s")
_LITERAL = re.compile(r"[`'\"()\[\]{}*=<>_#]|\d")


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Unit:
    """One docstring's prose sentences, with where it came from."""

    topic: int
    module: str
    kind: str  # "module", "class" or "function" (methods included)
    sentences: tuple[str, ...]


def _own_doc(obj: object) -> str:
    """The object's own docstring (a class's is not inherited), cleaned; '' if none."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _defined_in(obj: object, module: str) -> bool:
    owner = getattr(obj, "__module__", None)
    return owner in (module, "_" + module.rsplit(".", 1)[-1])


def _member_docs(module: object, name: str) -> Iterator[tuple[str, str]]:
    """(kind, docstring) of the module, its public classes, functions and methods."""
    yield "module", _own_doc(module)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not _defined_in(obj, name):
            continue
        if inspect.isclass(obj):
            yield "class", _own_doc(obj)
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_"):
                    continue
                inner = getattr(method, "__func__", None) or getattr(method, "fget", None)
                target = inner or method
                if inspect.isroutine(target) or isinstance(method, property):
                    yield "function", _own_doc(target)
        elif callable(obj):
            yield "function", _own_doc(obj)


def split_sentences(doc: str) -> list[str]:
    """Prose sentences of a docstring: code, lists and odd fragments are left out."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.strip("\n").split("\n")
        if (">>>" in paragraph or paragraph.rstrip().endswith("::")
                or any(line.startswith((" ", "\t")) for line in lines[1:])
                or any(_LIST_ITEM.match(line) for line in lines)):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if (5 <= len(words) <= 40 and sentence[-1] in ".!?"
                    and sum(c.isalpha() for c in sentence) > 0.6 * len(sentence)):
                out.append(" ".join(words))
    return out


@lru_cache(maxsize=1)
def load_units() -> tuple[Unit, ...]:
    """The corpus: every docstring with at least one sentence, in a fixed order."""
    seen_docs: set[str] = set()
    seen_sentences: set[str] = set()
    units = []
    for topic, modules in enumerate(TOPICS.values()):
        for name in sorted(modules):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for kind, doc in _member_docs(module, name):
                if not doc or doc in seen_docs:
                    continue
                seen_docs.add(doc)
                sentences = [s for s in split_sentences(doc) if s not in seen_sentences]
                seen_sentences.update(sentences)
                if sentences:
                    units.append(Unit(topic, name, kind, tuple(sentences)))
    return tuple(units)


def split_units(units: tuple[Unit, ...], seed: int) -> dict[str, list[Unit]]:
    """Seeded train/val/test split of docstrings, about 70/15/15 in sentences."""
    order = list(units)
    random.Random(f"split-{seed}").shuffle(order)
    total = sum(len(u.sentences) for u in order)
    bounds = [SPLIT_FRACTIONS[0] * total, (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * total]
    out: dict[str, list[Unit]] = {split: [] for split in SPLITS}
    count = 0
    for unit in order:
        split = "train" if count < bounds[0] else "val" if count < bounds[1] else "test"
        out[split].append(unit)
        count += len(unit.sentences)
    return out


def pretraining_texts(seed: int = 0) -> list[str]:
    """Unlabelled text for language-model pretraining: the train split's docstrings (one
    string each) and the prose of ``pydoc_data.topics`` (the language reference shipped
    with Python; skipped where absent)."""
    texts = [" ".join(u.sentences) for u in split_units(load_units(), seed)["train"]]
    return texts + _reference_paragraphs()


def _reference_paragraphs() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith((" ", "*", "=")):
                continue
            text = " ".join(paragraph.split())
            if len(text) > 40 and sum(c.isalpha() for c in text) > 0.7 * len(text):
                out.append(text)
    return out


# ------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Example:
    """One input (a sentence, or a pair) with its label."""

    text: str
    label: int
    pair: str | None = None


@dataclass(frozen=True)
class TextTask:
    """A classification task with its train/val/test examples."""

    name: str
    description: str
    n_classes: int
    is_pair: bool
    splits: dict[str, list[Example]] = field(default_factory=dict)


Builder = Callable[[list[Unit], int, random.Random], list[Example]]


def _balanced(groups: list[list[Example]], n: int, rng: random.Random) -> list[Example]:
    """Equal numbers per class (n // classes, or the smallest class), shuffled; with the
    same ``rng`` state, a smaller ``n`` gives a subset."""
    per_class = min([n // len(groups)] + [len(g) for g in groups])
    out = []
    for group in groups:
        order = list(range(len(group)))
        rng.shuffle(order)  # the chosen ones for a smaller n are a subset
        out += [group[i] for i in order[:per_class]]
    rng.shuffle(out)
    return out


def _sentences(units: list[Unit]) -> list[tuple[Unit, str]]:
    return [(u, s) for u in units for s in u.sentences]


def _consecutive(units: list[Unit]) -> list[tuple[Unit, str, str]]:
    return [(u, a, b) for u in units for a, b in pairwise(u.sentences)]


def _topic(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    groups: list[list[Example]] = [[] for _ in TOPICS]
    for unit, sentence in _sentences(units):
        groups[unit.topic].append(Example(sentence, unit.topic))
    return _balanced(groups, n, rng)


def _kind(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    groups: list[list[Example]] = [[], []]
    for unit, sentence in _sentences(units):
        label = int(unit.kind != "function")
        groups[label].append(Example(sentence, label))
    return _balanced(groups, n, rng)


def _literal(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    groups: list[list[Example]] = [[], []]
    for _, sentence in _sentences(units):
        label = int(bool(_LITERAL.search(sentence)))
        groups[label].append(Example(sentence, label))
    return _balanced(groups, n, rng)


def _summary(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    groups: list[list[Example]] = [[], []]
    for unit in units:
        groups[1].append(Example(unit.sentences[0], 1))
        groups[0] += [Example(s, 0) for s in unit.sentences[1:]]
    return _balanced(groups, n, rng)


def _shuffled(words: list[str], rng: random.Random) -> list[str] | None:
    """The words in a random different order (None when every order is the same)."""
    for _ in range(10):
        shuffled = rng.sample(words, len(words))
        if shuffled != words:
            return shuffled
    return None


def _acceptability(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    pool = [s for _, s in _sentences(units)]
    rng.shuffle(pool)
    half = len(pool) // 2
    real = [Example(s, 1) for s in pool[:half]]
    corrupted = []
    for sentence in pool[half:]:
        words = _shuffled(sentence.split(), rng)
        if words is not None:
            corrupted.append(Example(" ".join(words), 0))
    return _balanced([corrupted, real], n, rng)


def _next_sentence(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    pairs = _consecutive(units)
    rng.shuffle(pairs)
    pool = _sentences(units)
    half = len(pairs) // 2
    positives = [Example(a, 1, b) for _, a, b in pairs[:half]]
    negatives = []
    for unit, a, _ in pairs[half:]:
        other, b = rng.choice(pool)
        if other is not unit:
            negatives.append(Example(a, 0, b))
    return _balanced([negatives, positives], n, rng)


def _order(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    pairs = _consecutive(units)
    rng.shuffle(pairs)
    half = len(pairs) // 2
    in_order = [Example(a, 1, b) for _, a, b in pairs[:half]]
    swapped = [Example(b, 0, a) for _, a, b in pairs[half:]]
    return _balanced([swapped, in_order], n, rng)


def _entailment(units: list[Unit], n: int, rng: random.Random) -> list[Example]:
    pool = [s for _, s in _sentences(units) if len(s.split()) >= 8]
    rng.shuffle(pool)
    half = len(pool) // 2
    out: list[list[Example]] = [[], []]
    for index, sentence in enumerate(pool):
        label = int(index < half)
        source = sentence if label else rng.choice(pool)
        if source == sentence and not label:
            continue
        words = source.split()
        length = rng.randint(4, min(10, len(words) - 2))
        start = rng.randrange(len(words) - length + 1)
        out[label].append(Example(sentence, label, " ".join(words[start:start + length])))
    return _balanced(out, n, rng)


@dataclass(frozen=True)
class _Spec:
    description: str
    n_classes: int
    is_pair: bool
    build: Builder


_SPECS: dict[str, _Spec] = {
    "topic": _Spec("topic of the sentence's module (6 topics)", len(TOPICS), False, _topic),
    "acceptability": _Spec("real sentence (1) or its words shuffled (0)", 2, False,
                           _acceptability),
    "kind": _Spec("from a class or module docstring (1) or a function's (0)", 2, False,
                  _kind),
    "literal": _Spec("contains a code or literal character: quote, bracket, digit, "
                     "underscore, operator (1)", 2, False, _literal),
    "summary": _Spec("the first sentence of its docstring (1) or a later one (0)", 2, False,
                     _summary),
    "next": _Spec("B directly follows A in one docstring (1) or is a sentence of another "
                  "docstring (0)", 2, True, _next_sentence),
    "order": _Spec("consecutive sentences A, B in order (1) or swapped (0)", 2, True, _order),
    "entailment": _Spec("B is a span of A (1) or of another sentence (0)", 2,
                        True, _entailment),
}
#: The suites' tasks.
TASK_NAMES: tuple[str, ...] = tuple(_SPECS)
TINY_TASK_NAMES: tuple[str, ...] = ("acceptability", "literal", "summary")


def build_task(name: str, seed: int = 0, sizes: tuple[int, int, int] = FULL_SIZES
               ) -> TextTask:
    """One task's balanced train/val/test examples (deterministic for a seed)."""
    spec = _SPECS[name]
    units = split_units(load_units(), seed)
    splits = {}
    for split, size in zip(SPLITS, sizes, strict=True):
        rng = random.Random(f"{name}-{split}-{seed}")
        splits[split] = spec.build(units[split], size, rng)
    return TextTask(name, spec.description, spec.n_classes, spec.is_pair, splits)


def build_tasks(seed: int = 0, tiny: bool = False, names: tuple[str, ...] | None = None,
                sizes: tuple[int, int, int] | None = None) -> list[TextTask]:
    """The suite's tasks: all of :data:`TASK_NAMES`, or the three tiny ones. Smaller
    ``sizes`` (for a costlier model) give subsets of the default splits."""
    names = names or (TINY_TASK_NAMES if tiny else TASK_NAMES)
    sizes = sizes or (TINY_SIZES if tiny else FULL_SIZES)
    return [build_task(name, seed, sizes) for name in names]
