"""The bundled model's text corpus: Python standard-library sources, split by file.

Why the stdlib: it is real, varied text that exists on every machine that can run mixprec, so the
bundled model can be retrained anywhere without a download. Why split by file: neighbouring lines of
one file are near-duplicates, so a token-level split would leak training text into the held-out
parts. Each file goes to train / calibration / evaluation by a sha256 of its relative path, which
keeps the assignment stable across machines and across patch releases of the same Python minor
version (a file added or removed by a patch release changes only its own split).

The shipped token files (`calibration.safetensors`, `evaluation.safetensors`) remain the source of
truth for later stages; this module exists to (re)create them and to train the model.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SPLIT_NAMES",
    "CorpusConfig",
    "SourceFile",
    "CorpusSplit",
    "Corpus",
    "stdlib_root",
    "discover_files",
    "split_of",
    "split_corpus",
    "load_corpus",
]

log = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, str, str] = ("train", "calibration", "evaluation")
_BUCKETS = 10_000


@dataclass(frozen=True)
class CorpusConfig:
    """Which stdlib files to read and how to divide them.

    `exclude_top_dirs` drops CPython's own regression suite (`test/`) by default: Linux distributions
    ship it as a separate, often absent package, and it deliberately contains files in odd encodings
    and broken syntax, so leaving it out makes the corpus the same on more machines.
    """

    root: Path | None = None
    max_file_bytes: int = 500_000
    calibration_fraction: float = 0.05
    evaluation_fraction: float = 0.05
    exclude_top_dirs: tuple[str, ...] = ("test",)

    def __post_init__(self) -> None:
        if self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")
        for name in ("calibration_fraction", "evaluation_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {value}")

    def resolved_root(self) -> Path:
        """The folder to scan: `root` if given, else this interpreter's stdlib."""
        return Path(self.root) if self.root is not None else stdlib_root()


@dataclass(frozen=True)
class SourceFile:
    """One decoded source file, named by its POSIX path relative to the corpus root."""

    rel_path: str
    text: str


@dataclass(frozen=True)
class CorpusSplit:
    """The files of one split, in sorted relative-path order."""

    name: str
    files: tuple[SourceFile, ...] = field(default_factory=tuple)

    @property
    def rel_paths(self) -> list[str]:
        return [f.rel_path for f in self.files]

    @property
    def texts(self) -> list[str]:
        return [f.text for f in self.files]

    @property
    def num_bytes(self) -> int:
        return sum(len(f.text.encode("utf-8")) for f in self.files)

    def sha256(self) -> str:
        """sha256 of the UTF-8 texts concatenated in file order (no separators).

        Identifies the exact text a token file was made from; two machines agree on it only if
        they read byte-identical files.
        """
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.text.encode("utf-8"))
        return digest.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """The three disjoint splits."""

    train: CorpusSplit
    calibration: CorpusSplit
    evaluation: CorpusSplit

    def splits(self) -> tuple[CorpusSplit, CorpusSplit, CorpusSplit]:
        return (self.train, self.calibration, self.evaluation)


def stdlib_root() -> Path:
    """The pure-Python standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _wanted(rel: Path, config: CorpusConfig) -> bool:
    if "site-packages" in rel.parts or "__pycache__" in rel.parts:
        return False
    return not (len(rel.parts) > 1 and rel.parts[0] in config.exclude_top_dirs)


def discover_files(config: CorpusConfig) -> list[SourceFile]:
    """All usable `.py` files under the root, sorted by relative path.

    Skipped: third-party packages, files larger than `max_file_bytes` (generated tables such as
    `pydoc_data/topics.py` would dominate a split) and files that are not valid UTF-8.
    """
    root = config.resolved_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a folder")
    found: list[SourceFile] = []
    skipped = {"large": 0, "not_utf8": 0}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not path.is_file() or not _wanted(rel, config):
            continue
        data = path.read_bytes()
        if len(data) > config.max_file_bytes:
            skipped["large"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        found.append(SourceFile(rel.as_posix(), text))
    found.sort(key=lambda f: f.rel_path)
    log.info("corpus: %d files under %s (skipped %s)", len(found), root, skipped)
    return found


def split_of(rel_path: str, config: CorpusConfig) -> str:
    """The split a file belongs to, from a sha256 of its relative path alone."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    evaluation_end = round(config.evaluation_fraction * _BUCKETS)
    calibration_end = evaluation_end + round(config.calibration_fraction * _BUCKETS)
    if bucket < evaluation_end:
        return "evaluation"
    if bucket < calibration_end:
        return "calibration"
    return "train"


def split_corpus(files: list[SourceFile], config: CorpusConfig) -> Corpus:
    """Divide `files` into the three splits; order within a split follows `files`."""
    groups: dict[str, list[SourceFile]] = {name: [] for name in SPLIT_NAMES}
    for f in files:
        groups[split_of(f.rel_path, config)].append(f)
    return Corpus(*(CorpusSplit(name, tuple(groups[name])) for name in SPLIT_NAMES))


def load_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Discover and split the corpus; every split must be non-empty."""
    config = config or CorpusConfig()
    corpus = split_corpus(discover_files(config), config)
    for split in corpus.splits():
        if not split.files:
            raise ValueError(f"split {split.name!r} is empty; use a larger corpus root or larger fractions")
    return corpus
