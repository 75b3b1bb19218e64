"""Sensitivity measurement: the end-to-end KL damage of every group at every bit width.

For each (group, bits) job the group alone is swapped to that variant and KL(reference ‖ swapped)
is measured per token with the real top-k routing (`mixprec.measure.engine.core.KLEngine`). Two directions
(FIELD.md §1):

* drop: start from the unquantized model and lower one group (AMQ, Thireus, exllamav3 attribution);
* raise: start from every group at `base_bits` and raise one group (exllamav3 `measure`).

They disagree most on small reused groups, and the search uses both. Results go to
WORK/measure/<mode>-<granularity>/ (see `mixprec.measure.table`), jobs are shared by any number of
workers through an Optuna storage (`mixprec.measure.store`), and a table is tied to its model,
variants, data and settings by fingerprint.

Usage from Python:

    config = MeasureConfig(work=Path("work/stdlib-moe"), bits=(2, 3, 4, 5, 6, 8), mode="drop")
    folder = run_measure(config)
    measurement = load_measurement(folder)   # .table (pandas), .summary (MeasurementSummary)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import read_json
from mixprec.core.kl import TokenComparison, paired_difference, summarize
from mixprec.core.progress import progress
from mixprec.core.storage import open_storage
from mixprec.core.storage_url import redact, storage_path
from mixprec.measure.config import MeasureConfig
from mixprec.measure.engine.core import KLEngine, resolve_device
from mixprec.measure.inputs import check_disjoint, measure_variants, measurement_fingerprint
from mixprec.measure.split import check_split, fine_config, run_split
from mixprec.measure.store import Job, JobStore
from mixprec.measure.table import MeasurementRow, is_finished, reference_bits, write_outputs
from mixprec.model.arch import GroupKind
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap
from mixprec.model.streaming import open_model

__all__ = ["Worker", "run_measure", "measurement_jobs", "refuse_foreign_table"]

log = logging.getLogger(__name__)


def _same_storage(a: str, b: str) -> bool:
    path_a, path_b = storage_path(a), storage_path(b)
    if path_a is not None and path_b is not None:
        return path_a.resolve() == path_b.resolve()
    return a == b


def refuse_foreign_table(config: MeasureConfig) -> None:
    """Refuse to write over a finished table that another storage's jobs made: its table.csv would be replaced
    by this run's (one folder, two measurements). The same storage reuses and rewrites its own table."""
    summary_path = config.folder / "summary.json"
    if not summary_path.is_file():
        return
    recorded = read_json(summary_path).get("storage")
    mine = config.storage or str(config.folder / "journal.log")
    # Note: the default journal is recorded as a path relative to where that run started; any folder's own
    # journal.log counts as this folder's when this run uses the default too.
    default = config.storage is None and isinstance(recorded, str) and Path(recorded).name == "journal.log" \
        and Path(recorded).parent.name == config.folder.name
    if isinstance(recorded, str) and not default and not _same_storage(recorded, mine):
        raise MixprecError(f"{config.folder} already holds a finished table measured with storage "
                           f"{redact(recorded)}; this run uses {redact(mine)}. Pass --storage {redact(recorded)} "
                           "to continue that measurement, or use another --work folder")

def measurement_jobs(model_map: ModelMap, config: MeasureConfig) -> list[Job]:
    """Every (group, bits) job in layer order, so jobs claimed together share their first layer."""
    kinds = [GroupKind(k) for k in config.kinds]
    groups = model_map.select(kinds)
    if not groups:
        raise MixprecError(f"the model has no groups of kinds {list(config.kinds)}")
    position = {g.name: (model_map.num_layers if g.layer is None else g.layer) for g in groups}
    if any(g.kind is GroupKind.EMBEDDING for g in groups):
        position["embed"] = -1
    return [Job(g.name, b, position[g.name]) for g in groups for b in config.measured_bits]


class Worker:
    """One measuring process: prepare (inputs, job store, engine) once, then `run` claims and measures jobs."""

    def __init__(self, config: MeasureConfig) -> None:
        self.config = config
        refuse_foreign_table(config)
        self.checkpoint = Checkpoint.open(config.model)
        self.model_map = self.checkpoint.model_map(config.granularity)
        self.jobs = measurement_jobs(self.model_map, config)
        # Note: data, jobs and storage are checked before the variants, which may take long to quantize.
        self.windows = load_windows(self.checkpoint.path, config.split,
                                    WindowConfig(config.seq_len, config.num_windows), list(config.data_files) or None)
        storage = open_storage(config.storage, config.folder)
        self.variants = measure_variants(config, self.checkpoint)
        check_disjoint(self.variants, self.windows)
        lock = config.folder / ".enqueue.lock" if config.storage is None else None
        fingerprint = measurement_fingerprint(self.checkpoint, self.variants, self.windows, config)
        self.store = JobStore(storage, fingerprint, lock)
        self.store.enqueue(self.jobs)
        self.store.recover_stale(config.reset_stale)
        self.engine: KLEngine | None = None
        self.base: TokenComparison | None = None
        self._reference_bits: dict[str, int] = {}

    def _prepare_engine(self) -> KLEngine:
        if self.engine is None:
            device = resolve_device(self.config.device)
            model = open_model(self.checkpoint, self.config.streaming, device, self.config.max_memory)
            engine_config = self.config.engine if self.config.max_memory is None else \
                self.config.engine.within(self.config.max_memory)
            self.engine = KLEngine(model, self.model_map, self.windows, self.variants, self.config.device,
                                   engine_config)
            log.info("reference: %d windows x %d tokens in %.1f s on %s", self.engine.num_sequences,
                     self.config.seq_len, self.engine.reference_seconds, self.engine.device)
            if self.config.mode == "raise":
                self.base = self.engine.evaluate(self._base_assignment())
            self._record_shared(self.engine)
        return self.engine

    def _base_assignment(self) -> dict[str, int | None]:
        if self.config.mode == "drop":
            return {}
        return dict.fromkeys(dict.fromkeys(job.group for job in self.jobs), self.config.base_bits)

    def _record_shared(self, engine: KLEngine) -> None:
        """Noise floors, the base's KL and engine facts, measured once per table by the first worker."""
        if self.store.get_attr("noise_floor") is None:
            n = engine.num_sequences
            self.store.set_attr("noise_floor", {
                "repeat_fp32": summarize(engine.evaluate_full({}), n).to_dict(),
                "bf16_compute": summarize(engine.evaluate_full({}, autocast_dtype=torch.bfloat16), n).to_dict(),
            })
        if self.store.get_attr("base") is None:
            base = summarize(self.base, engine.num_sequences).to_dict() if self.base is not None else None
            self.store.set_attr("base", {"assignment_bits": self.config.base_bits if self.base else None,
                                         "summary": base})
        if self.store.get_attr("engine") is None:
            self.store.set_attr("engine", {"device": str(engine.device), "dtype": str(engine.dtype).split(".")[-1],
                                           "reference_s": round(engine.reference_seconds, 3),
                                           "streamed": engine.streamed is not None,
                                           "state_dtype": str(engine.state_dtype).split(".")[-1],
                                           "config": asdict(engine.config)})

    def run(self) -> int:
        """Claim and measure jobs until none is waiting (or `max_jobs` is reached); returns jobs done."""
        done = 0
        limit = self.config.max_jobs
        ticks = progress(range(len(self.jobs)), desc=f"measure {self.config.folder.name}", unit="job")
        while limit is None or done < limit:
            batch = self.store.claim(self.config.batch_jobs if limit is None else min(self.config.batch_jobs,
                                                                                      limit - done))
            if not batch:
                # Note: jobs held by a worker that died meanwhile (on this host, or anywhere with --reset-stale)
                # are re-queued here, so the survivors of a scale-out finish the table without a rerun.
                if self.store.recover_stale(self.config.reset_stale):
                    continue
                break
            try:
                self._measure(batch)
            except BaseException:
                self.store.abandon([trial_id for trial_id, _ in batch], "error")
                raise
            done += len(batch)
            for _ in batch:
                next(ticks, None)
        if self.engine is not None:
            log.info("%d jobs measured; %d layer forwards", done, self.engine.layer_forwards)
        return done

    def _measure(self, batch: list[tuple[int, Job]]) -> None:
        engine = self._prepare_engine()
        base = self._base_assignment()
        started = time.perf_counter()
        results = engine.evaluate_many([{**base, job.group: job.bits} for _, job in batch])
        seconds = (time.perf_counter() - started) / len(batch)
        for (trial_id, job), result in zip(batch, results, strict=True):
            row = self._row(job, result, seconds)
            self.store.finish(trial_id, row.to_dict(), row.dkl)
            log.debug("%s: kl %.3e ± %.1e", job.key, row.kl_mean, row.kl_se)

    def _row(self, job: Job, result: TokenComparison, seconds: float) -> MeasurementRow:
        engine = self.engine
        assert engine is not None
        group = self.model_map.group(job.group)
        stats = summarize(result, engine.num_sequences)
        storage = self.variants[job.bits].storage_bits(group)
        if self.base is None:
            if group.name not in self._reference_bits:
                self._reference_bits[group.name] = reference_bits(self.checkpoint, group)
            base_storage = self._reference_bits[group.name]
            base_bits = round(base_storage / group.num_params)  # the checkpoint's dtype width, e.g. 16 for bf16
            dkl, dkl_se = stats.kl_mean, stats.kl_se
        else:
            base_bits, base_storage = self.config.base_bits, self.variants[self.config.base_bits].storage_bits(group)
            dkl, dkl_se = paired_difference(result.kl, self.base.kl, engine.num_sequences)
        return MeasurementRow(
            group=group.name, kind=group.kind.value, layer=group.layer, params=group.num_params,
            mode=self.config.mode, base_bits=base_bits, bits=job.bits,
            variant_id=self.variants[job.bits].manifest.variant_id, storage_bits=storage,
            delta_bits=storage - base_storage, bpw=storage / group.num_params,
            kl_mean=stats.kl_mean, kl_se=stats.kl_se, kl_median=stats.kl_median, kl_p90=stats.kl_p90,
            kl_p99=stats.kl_p99, same_top1=stats.same_top1, same_top1_se=stats.same_top1_se,
            rms_dp=stats.rms_dp, ln_ppl_ratio=stats.ln_ppl_ratio, dkl=dkl, dkl_se=dkl_se,
            n_tokens=stats.n_tokens, n_sequences=stats.n_sequences, seconds=seconds,
            device=str(engine.device), worker=f"{self.store.owner['host']}:{self.store.owner['pid']}",
        )

    def write(self) -> Path | None:
        """Write table.csv, summary.json and measurement.json if every job is done; returns the folder."""
        rows = self.store.rows()
        missing = [job.key for job in self.jobs if job.key not in rows]
        if missing:
            log.info("%d of %d jobs are not finished yet (%s…); the worker that finishes last writes the table",
                     len(missing), len(self.jobs), ", ".join(missing[:3]))
            return None
        write_outputs(self.config, self.checkpoint, self.model_map, self.variants, self.windows, self.jobs, rows,
                      self.store)
        return self.config.folder


def _worker_process(config: MeasureConfig, threads: int) -> None:
    """Entry point of a spawned worker process (`run_measure(workers=N)`)."""
    torch.set_num_threads(threads)
    Worker(config).run()


def _run_with_threads(worker: Worker, threads: int | None) -> None:
    """Run `worker` here with `threads` intra-op threads, restoring the caller's setting afterwards (a library
    call must not leave the caller's torch configured differently)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        worker.run()
    finally:
        torch.set_num_threads(before)


def run_measure(config: MeasureConfig, workers: int = 1) -> Path | None:
    """Measure every job of the table (with `workers` processes on this machine) and write the outputs.

    Returns the measurement folder, or None when other workers still hold jobs (they write it). Split mode
    measures the fine table it is derived from first (`mixprec.measure.split`).
    """
    if config.mode == "split":
        check_split(config)
        if not is_finished(fine_config(config).folder) and run_measure(fine_config(config), workers) is None:
            return None
        return run_split(config)
    worker = Worker(config)  # validates inputs, quantizes missing variants and enqueues before any fork
    processes = []
    threads: int | None = None
    if workers > 1:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        threads = max(1, torch.get_num_threads() // workers)
        processes = [context.Process(target=_worker_process, args=(config, threads)) for _ in range(workers - 1)]
        for process in processes:
            process.start()
    _run_with_threads(worker, threads)
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise MixprecError(f"a worker process exited with code {process.exitcode}; re-run the same command "
                               "to measure the jobs it left")
    return worker.write()
