"""Optuna studies in the browser: serve them with optuna-dashboard, and attach report files to them.

Quant publishers compare recipes in the dashboard (history, Pareto front, the trial table with every
trial's bpw, predicted and measured KL), so the files that explain a study belong next to it:

* the search attaches each trial's recipe YAML while the trial runs (`mixprec.search.study`), into
  `<studies dir>/artifacts/`, the store `serve` hands to the dashboard by default;
* `attach_report` adds the report's figures, its Markdown summary and the chosen recipe to the
  study afterwards. Optuna refuses to change a finished trial, so these are study artifacts, and
  the study's dashboard note is rewritten to show the figures and the recipes' held-out table.

Uploads are idempotent: every file is uploaded under a name holding its content hash, and a name
already attached is skipped, so re-running a report does not pile up copies.

optuna-dashboard is the optional `dashboard` extra; it is imported only by `serve` and the note.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import sha256_file

__all__ = ["DashboardConfig", "find_storage", "default_artifact_dir", "serve", "study_urls", "attach_files",
           "attach_report"]

log = logging.getLogger(__name__)


def _local_path(storage: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a database server."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///"))
    return Path(storage) if "://" not in storage else None


def default_artifact_dir(storage: str) -> Path | None:
    """Where `mixprec search` puts artifacts for this storage: `artifacts/` next to the study file."""
    path = _local_path(storage)
    return None if path is None else path.parent / "artifacts"


def find_storage(study: str | None, storage: str | None, studies_dir: Path) -> str:
    """`--storage` as given, else `studies_dir/<study>.db`, else the only database in `studies_dir`."""
    if storage is not None:
        path = _local_path(storage)
        if path is not None and not path.is_file():
            raise MixprecError(f"no study storage at {path}; run `mixprec search` first or pass the right --storage")
        return storage
    if study is not None:
        path = Path(studies_dir) / f"{study}.db"
        if not path.is_file():
            found = sorted(p.stem for p in Path(studies_dir).glob("*.db"))
            raise MixprecError(f"no study database {path}; studies in {studies_dir}: {found or 'none'} "
                               "(or pass --storage URL)")
        return f"sqlite:///{path}"
    found = sorted(Path(studies_dir).glob("*.db"))
    if not found:
        raise MixprecError(f"no study database in {studies_dir}; run `mixprec search` first, or point --studies-dir "
                           "at the folder holding them (the demo keeps them in WORK/studies)")
    if len(found) != 1:
        raise MixprecError(f"{studies_dir} holds {len(found)} study databases ({[p.stem for p in found]}); "
                           "choose one with --study NAME or --storage URL")
    return f"sqlite:///{found[0]}"


@dataclass(frozen=True)
class DashboardConfig:
    """What `mixprec dashboard` serves and where; `artifact_dir` None means next to the study file."""

    storage: str
    host: str = "127.0.0.1"
    port: int = 8080
    artifact_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise MixprecError(f"--port {self.port} is not a TCP port; use 1..65535 (default 8080)")
        if not self.host:
            raise MixprecError("--host must not be empty; use 127.0.0.1 to serve this machine only")

    @property
    def artifacts(self) -> Path | None:
        return self.artifact_dir if self.artifact_dir is not None else default_artifact_dir(self.storage)


def _storage(storage: str) -> Any:
    from mixprec.core.storage import open_storage

    return open_storage(storage, create=False)


def study_urls(config: DashboardConfig) -> dict[str, str]:
    """Study name -> its page on the dashboard this config serves."""
    host = "localhost" if config.host in ("127.0.0.1", "0.0.0.0", "::") else config.host
    return {s.study_name: f"http://{host}:{config.port}/dashboard/studies/{s._study_id}"
            for s in _storage(config.storage).get_all_studies()}


def serve(config: DashboardConfig) -> None:
    """Run optuna-dashboard on the storage until interrupted (blocks)."""
    try:
        import optuna_dashboard
    except ImportError as exc:
        raise MixprecError("the dashboard needs optuna-dashboard: pip install 'mixprec[dashboard]'") from exc
    from optuna.artifacts import FileSystemArtifactStore

    artifacts = config.artifacts
    store = FileSystemArtifactStore(str(artifacts)) if artifacts is not None and artifacts.is_dir() else None
    if store is None:
        log.warning("no artifact folder at %s: recipe and figure artifacts will not open", artifacts)
    optuna_dashboard.run_server(config.storage, host=config.host, port=config.port, artifact_store=store)


def attach_files(storage: str, study_name: str, files: Sequence[Path], artifact_dir: Path) -> dict[str, str]:
    """Upload `files` as study artifacts, reusing an identical one already attached.

    Returns each file's path -> its artifact id. Older versions of a file (other content) stay
    attached: Optuna has no artifact delete that its own `get_all_artifact_meta` tolerates.
    """
    import optuna
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    present = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(study)}
    ids = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in map(Path, files):
            name = f"{path.stem}-{sha256_file(path)[:10]}{path.suffix}"
            if name not in present:
                copy = Path(tmp) / name
                shutil.copyfile(path, copy)
                present[name] = upload_artifact(artifact_store=store, file_path=str(copy), study_or_trial=study)
            ids[str(path)] = present[name]
    return ids


def _note(study: Any, report_md: str, figures: dict[str, str]) -> None:
    """Rewrite the study's dashboard note: the report summary with its figures linked to their artifacts."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        log.info("optuna-dashboard is not installed: the study note is not written (pip install "
                 "'mixprec[dashboard]')")
        return
    for path, artifact_id in figures.items():
        report_md = report_md.replace(f"](figures/{Path(path).name})", f"](/artifacts/{study._study_id}/{artifact_id})")
    save_note(study, report_md)


def attach_report(report_dir: Path, storage: str, study_name: str, recipe: Path | None = None,
                  artifact_dir: Path | None = None) -> dict[str, str]:
    """Attach a report's figures, summary.md and the recipe to a study, and show the summary as its note.

    Returns each attached file's path -> artifact id (see `attach_files`)."""
    import optuna

    artifact_dir = artifact_dir or default_artifact_dir(storage)
    if artifact_dir is None:
        raise MixprecError(f"study storage {storage} is not a local file; give an artifact folder to attach to")
    figures = sorted((report_dir / "figures").glob("*.png"))
    ids = attach_files(storage, study_name, [*figures, report_dir / "summary.md", *([recipe] if recipe else [])],
                       artifact_dir)
    _note(optuna.load_study(study_name=study_name, storage=_storage(storage)),
          (report_dir / "summary.md").read_text(encoding="utf-8"), {str(f): ids[str(f)] for f in figures})
    return ids
