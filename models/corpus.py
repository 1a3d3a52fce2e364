"""Real English text the project did not write: sentences from the Python standard library's
docstrings.

Extracted at run time from the installed stdlib sources with :mod:`ast` (nothing is imported or
executed),
so the quality gate needs no data files and no network. The split is deterministic: each sentence is
assigned to *calibration* or *evaluation* by a hash of its text, so the two sets never overlap and
the
same interpreter always yields the same sentences in the same order.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: One sentence in this many goes to calibration; the rest is held out for evaluation.
CALIBRATION_EVERY = 5
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "turtledemo", "lib2to3", "__pycache__"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass(frozen=True)
class CorpusSplit:
    calibration: list[str]
    evaluation: list[str]
    #: Human-readable origin, recorded in manifests next to the metrics.
    source: str


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60 or ">>>" in sentence or "::" in sentence:
        return False
    alpha_words = sum(1 for w in words if _WORD.fullmatch(w.strip(".,;:()'\"")))
    return alpha_words / len(words) >= 0.7


def _sentences(docstring: str) -> list[str]:
    paragraphs = re.split(r"\n\s*\n", docstring)
    out: list[str] = []
    for paragraph in paragraphs:
        text = " ".join(paragraph.split())
        out.extend(s for s in _SENTENCE_END.split(text) if _is_prose(s))
    return out


def _bucket(sentence: str) -> int:
    return int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big")


def stdlib_sentences(*, evaluation: int = 1200, calibration: int = 300) -> CorpusSplit:
    """Deterministic calibration / held-out evaluation split of stdlib docstring sentences."""
    seen: set[str] = set()
    calib: list[str] = []
    held_out: list[str] = []
    for path in _stdlib_files():
        for doc in _docstrings(path):
            for sentence in _sentences(doc):
                if sentence in seen:
                    continue
                seen.add(sentence)
                is_calibration = _bucket(sentence) % CALIBRATION_EVERY == 0
                (calib if is_calibration else held_out).append(sentence)
        if len(held_out) >= evaluation * 3 and len(calib) >= calibration * 3:
            break
    if len(held_out) < evaluation or len(calib) < calibration:
        raise RuntimeError(
            f"stdlib yielded {len(held_out)} eval / {len(calib)} calibration sentences, "
            f"need {evaluation} / {calibration}"
        )
    # Spread the pick over the whole scan instead of the first modules alphabetically.
    held_out.sort(key=_bucket)
    calib.sort(key=_bucket)
    version = ".".join(map(str, sys.version_info[:3]))
    return CorpusSplit(
        calibration=calib[:calibration],
        evaluation=held_out[:evaluation],
        source=f"CPython {version} stdlib docstrings (hash split 1/{CALIBRATION_EVERY})",
    )
