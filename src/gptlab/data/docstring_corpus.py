"""Collects the built-in corpus; run as a script by `gptlab.data.sources.builtin_corpus`.

Standard library only, so the script needs nothing on sys.path beyond what Python ships:
``python -P docstring_corpus.py OUT_JSON [--site-packages] [--records]``. With ``--records`` it
writes (module, qualified name, docstring) triples instead of the corpus (finetuning tasks
such as "which package is this docstring from?" need to know where each text came from).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from pydoc_data.topics import topics
from types import ModuleType

# Modules that act on import (print, open a browser, run a CLI), need a GUI, are deprecated
# installers, or (distutils) may be setuptools' copy, which would tie the corpus to setuptools.
_STDLIB_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "__hello__",
        "__phello__",
        "idlelib",
        "tkinter",
        "_tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "distutils",
    }
)
# Installed packages whose docstrings join the corpus with include_site_packages=True.
SITE_PACKAGES = (
    "numpy",
    "torch",
    "lightning",
    "torchmetrics",
    "tokenizers",
    "omegaconf",
    "hydra",
    "tqdm",
    "yaml",
    "jinja2",
    "packaging",
)
_MIN_DOC_WORDS = 4
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def collect_docstrings(include_site_packages: bool) -> list[str]:
    """The documents of `gptlab.data.sources.builtin_corpus`; run in a fresh interpreter."""
    docs = [text for _, _, text in collect_records(include_site_packages)]
    docs += [text for text in map(_clean, (topics[key] for key in sorted(topics))) if text]
    return list(dict.fromkeys(docs))  # repeated docstrings are kept once, first one first


def collect_records(include_site_packages: bool) -> list[tuple[str, str, str]]:
    """(module, qualified name, docstring) for every docstring of the walked modules that has
    at least `_MIN_DOC_WORDS` words, in walk order; a text repeated in several places repeats."""
    modules = list(_walk_modules(sorted(sys.stdlib_module_names), include_private=True))
    if include_site_packages:
        # Private submodules of third-party packages are internals (and torch's are huge).
        installed = [name for name in SITE_PACKAGES if importlib.util.find_spec(name) is not None]
        modules += _walk_modules(installed, include_private=False)
    # Read namespaces only after every import: importing a submodule can add names to
    # its parent, so reading while walking would depend on the import order.
    return [
        (module.__name__, name, text)
        for module in modules
        for name, doc in _module_docs(module)
        if (text := _clean(doc))
    ]


def _clean(doc: str) -> str:
    """The docstring as the corpus stores it, or "" when it is too short to keep."""
    # Generated signatures can show default values' memory addresses, which vary per run.
    text = _ADDRESS.sub("", inspect.cleandoc(doc))
    return text if len(text.split()) >= _MIN_DOC_WORDS else ""


def _walk_modules(names: Iterable[str], include_private: bool) -> Iterator[ModuleType]:
    """Import each named module and, for packages, all submodules, depth first in sorted order."""
    for name in names:
        if _skip_module(name, include_private):
            continue
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit):  # platform-specific or broken optional modules
            continue
        yield module
        if hasattr(module, "__path__"):
            children = sorted(info.name for info in pkgutil.iter_modules(module.__path__))
            yield from _walk_modules([f"{name}.{child}" for child in children], include_private)


def _skip_module(name: str, include_private: bool) -> bool:
    parts = name.split(".")
    if parts[0] in _STDLIB_SKIP:
        return True
    for part in parts:
        if part in ("__main__", "test", "tests", "testing", "conftest"):
            return True
        if part.startswith(("test_", "_test")):
            return True
    return not include_private and any(part.startswith("_") for part in parts[1:])


def _module_docs(module: ModuleType) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of `module` and of the classes, methods and functions
    defined in it."""
    prefix = module.__name__
    yield prefix, _own_doc(module)
    namespace = vars(module)
    for key in sorted(namespace):
        obj = namespace[key]
        if _safe_getattr(obj, "__module__") != module.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{prefix}.{key}", _own_doc(obj)
            members = vars(obj)
            for member_name in sorted(members):
                member = members[member_name]
                if inspect.isroutine(member) or inspect.isdatadescriptor(member):
                    yield f"{prefix}.{key}.{member_name}", _own_doc(member)
        elif inspect.isroutine(obj):
            yield f"{prefix}.{key}", _own_doc(obj)


def _own_doc(obj: object) -> str:
    # __doc__ rather than inspect.getdoc: getdoc falls back to the base class's docstring,
    # which would repeat it for every override.
    doc = _safe_getattr(obj, "__doc__")
    return doc if isinstance(doc, str) else ""


def _safe_getattr(obj: object, name: str) -> object:
    # Some lazy proxies raise arbitrary errors from attribute access.
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


if __name__ == "__main__":
    site_packages = "--site-packages" in sys.argv[2:]
    if "--records" in sys.argv[2:]:
        result: list = collect_records(site_packages)
    else:
        result = collect_docstrings(site_packages)
    Path(sys.argv[1]).write_text(json.dumps(result), encoding="utf-8")
