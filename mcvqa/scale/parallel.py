"""## Several GPUs: folds in parallel, one worker process per GPU

On a machine with two or more GPUs (Kaggle's 2x T4, a multi-GPU server) every fold trains in its own
worker process on its own GPU, its 4-bit model wholly on that GPU. With more folds than GPUs the
folds queue: each starts as soon as a GPU is free. A fold writes only its own folder `foldK/`, so the
workers share nothing, and a re-run skips finished folds and resumes unfinished ones exactly as the
one-GPU loop does; the main process then reads the folds back and ensembles them as usual.

Workers are fresh Python processes (CUDA cannot be forked safely, least of all from Jupyter). Each
job (a function and its arguments) is pickled to a file the worker loads; inside this notebook,
where the code is not an installed package, `cloudpickle` sends the functions by value. Every line a
worker prints appears here prefixed with `[gpu k]` (and is kept in `<output_dir>/workers/*.log`); a
worker that fails raises an error naming its fold and GPU. Setting `parallel_folds`: `auto` (one
worker per GPU when there are 2+), `off`, or a number of workers. One GPU or the CPU runs the folds
one after the other in this process, as before.
"""

import dataclasses
import os
import pathlib
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from ..core.config import ConfigError
from ..machinery.process import process_group

# What a worker process runs: load (function, args, result path), call, save the result atomically.
WORKER_MAIN = """\
import os, pickle, sys
with open(sys.argv[1], "rb") as f:
    fn, args, result_path = pickle.load(f)
result = fn(*args)
os.makedirs(os.path.dirname(result_path), exist_ok=True)
with open(result_path + ".tmp", "wb") as f:
    pickle.dump(result, f)
os.replace(result_path + ".tmp", result_path)
"""
WORKER_TAIL_LINES = 25  # output lines of a failed worker repeated in the error
PROGRESS_EVERY_S = 10.0  # a worker's progress-bar redraws reach the notebook at most this often
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_worker_payload(path):
    """What a worker process runs, by hand: `python -m mcvqa worker PAYLOAD` (for debugging one job).

    Runs WORKER_MAIN in a fresh process exactly as a worker does (its output shows here), so there is
    one copy of the worker's steps; it is `python -c` source because inside a notebook this package
    need not be importable."""
    subprocess.run([sys.executable, "-c", WORKER_MAIN, str(path)], check=True)


class WorkerError(RuntimeError):
    """One or more worker processes failed; the message names each job (fold) and its GPU."""


@dataclasses.dataclass
class WorkerJob:
    label: str  # what it is, for messages and log names: "fold 2", "test rows 0-499"
    fn: object  # called in the worker as fn(*args); its return value comes back
    args: tuple = ()


@dataclasses.dataclass
class WorkerSlot:
    label: str  # "gpu 1" (or "cpu 0" for CPU worker processes)
    env: dict  # environment changes of a worker on this slot (CUDA_VISIBLE_DEVICES, threads)


def _in_package():
    """False when this code runs as a notebook cell (module name __main__), not as mcvqa.parallel."""
    return __name__ != "__main__"


def _pickler():
    """cloudpickle when installed (needed in the notebook: functions of __main__ travel by value)."""
    try:
        import cloudpickle  # noqa: PLC0415 - optional dependency
        return cloudpickle
    except ImportError:
        return None


def parallel_workers(cfg, hardware, n_jobs, verbose=True):
    """How many worker processes run the folds; 0 means the one-after-the-other loop in this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun / accelerate launch the ranks train each fold together (scale/distributed.py): no workers.
        group = process_group()
        if group.world_size <= 1:
            raise RuntimeError(
                "started by torchrun / accelerate launch (WORLD_SIZE > 1) but torch.distributed is not initialised: "
                "every rank would train every fold alone. Run `python -m mcvqa run` (the command line calls "
                "init_distributed()) or call init_distributed() first.")
        if verbose and group.is_main():
            print(f"[parallel] DDP: {n_jobs} fold(s) one after the other, each split across all {group.world_size} ranks")
        return 0
    setting = str(cfg.parallel_folds).strip().lower()
    if setting in ("off", "false", "no", "0", "1"):
        wanted, why = 0, f"parallel_folds={cfg.parallel_folds}"
    elif setting == "auto":
        wanted = hardware.gpu_count if hardware.device == "cuda" else 0
        why = f"{hardware.gpu_count} GPU(s) seen" if hardware.device == "cuda" else "no GPU"
    else:
        try:
            wanted = int(setting)
        except ValueError:
            raise ConfigError(f"config: parallel_folds must be auto, off or a number, got {cfg.parallel_folds!r}") from None
        why = f"parallel_folds={wanted}"
        if hardware.device == "cuda" and wanted > hardware.gpu_count:
            wanted, why = hardware.gpu_count, f"{why}, but only {hardware.gpu_count} GPU(s)"
    workers = min(wanted, n_jobs)
    if workers >= 2 and not _in_package() and _pickler() is None:
        workers, why = 0, "cloudpickle is not installed (the notebook needs it to start workers)"
    elif wanted >= 2 > n_jobs:
        why = f"{why}, but only {n_jobs} fold(s) to run"
    if workers < 2:
        if verbose:
            print(f"[parallel] folds run one after the other in this process ({why})")
        return 0
    if verbose:
        print(f"[parallel] {n_jobs} fold(s) on {workers} worker processes, one per "
              f"{'GPU' if hardware.device == 'cuda' else 'CPU share'} ({why}); more folds than workers queue")
    return workers


def worker_slots(hardware, n_workers):
    """One slot per worker: GPU k of this process's visible GPUs (CUDA_VISIBLE_DEVICES), or a CPU share."""
    threads = str(max(1, (os.cpu_count() or 1) // n_workers))
    base = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": threads}
    if hardware.device != "cuda":
        return [WorkerSlot(f"cpu {k}", {**base, "CUDA_VISIBLE_DEVICES": ""}) for k in range(n_workers)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(k) for k in range(n_workers)]
    if len(ids) < n_workers:
        raise ValueError(f"{n_workers} GPU workers asked for, but CUDA_VISIBLE_DEVICES={visible!r} names {len(ids)}")
    return [WorkerSlot(f"gpu {k}", {**base, "CUDA_VISIBLE_DEVICES": ids[k]}) for k in range(n_workers)]


def run_folds(run_fold, fold_args, cfg, hardware, log_dir):
    """`run_fold(*args)` for every fold in `fold_args` ({fold: args}): in worker processes, one per GPU,
    when `parallel_workers` says so; else one after the other in this process (one GPU, or the CPU)."""
    n_workers = parallel_workers(cfg, hardware, len(fold_args))
    if not n_workers:
        for args in fold_args.values():
            run_fold(*args)
        return
    jobs = [WorkerJob(f"fold {fold}", run_fold, tuple(args)) for fold, args in fold_args.items()]
    run_in_workers(jobs, worker_slots(hardware, n_workers), log_dir)


class WorkerOutput:
    """One worker's raw output -> display lines "[gpu k] ...": ANSI codes dropped, blank lines skipped,
    and progress-bar redraws (text ended by a carriage return) shown at most every `progress_every_s`
    seconds, so a bar that redraws every step does not flood the notebook (the log keeps everything)."""

    def __init__(self, label, progress_every_s=PROGRESS_EVERY_S, clock=time.monotonic):
        self.label, self.progress_every_s, self.clock = label, progress_every_s, clock
        self.last_progress = None

    def feed(self, text):
        parts = re.split(r"(\r\n|\n|\r)", _ANSI_ESCAPE.sub("", text))
        shown = []
        for body, end in zip(parts[0::2], parts[1::2] + [""]):
            body = body.strip()
            if not body:
                continue
            if end == "\r":
                now = self.clock()
                if self.last_progress is not None and now - self.last_progress < self.progress_every_s:
                    continue
                self.last_progress = now
            shown.append(f"[{self.label}] {body}")
        return shown


def _pump(stream, output, lines, log):
    """Thread: read a worker's output as it comes, log it, queue its display lines for the main thread."""
    pending = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        pending += chunk
        cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
        if cut < 0:
            continue
        text, pending = pending[:cut + 1].decode("utf-8", "replace"), pending[cut + 1:]
        log.write(text)
        log.flush()
        for line in output.feed(text):
            lines.put(line)
    if pending:
        text = pending.decode("utf-8", "replace")
        log.write(text)
        for line in output.feed(text):
            lines.put(line)
    log.close()


def _worker_env(slot):
    env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TQDM_MININTERVAL", "10")  # piped progress bars: one line per 10 s, not ten a second
    if _in_package():
        # The worker unpickles mcvqa's functions by reference: make the package importable from any cwd.
        root = str(pathlib.Path(sys.modules[__name__.partition(".")[0]].__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _safe_name(label):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _stop(proc):
    """End a worker and everything it started (it leads its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class _WorkerLines:
    """The workers' display lines: queued by their output threads (_pump), echoed by the main thread, and the
    last WORKER_TAIL_LINES of each slot kept for a failure's message."""

    def __init__(self, echo):
        self.echo, self.queue, self.tails = echo, queue.Queue(), {}  # tails: slot label -> its last lines

    def show(self, line):
        self.echo(line)
        label = line[1:line.index("]")]
        self.tails.setdefault(label, []).append(line)
        del self.tails[label][:-WORKER_TAIL_LINES]

    def show_queued(self, wait_s=0.0):
        try:
            self.show(self.queue.get(timeout=wait_s) if wait_s else self.queue.get_nowait())
            while True:
                self.show(self.queue.get_nowait())
        except queue.Empty:
            pass


def _start_worker(job, slot, payload, log_path, pickler, lines):
    """A fresh worker process for `job` on `slot`, its job pickled to `payload`; returns (process, output thread)."""
    with open(payload, "wb") as f:
        pickler.dump((job.fn, tuple(job.args), f"{payload}.result"), f)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_MAIN, str(payload)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_worker_env(slot),
                            start_new_session=True)
    pump = threading.Thread(target=_pump, daemon=True,
                            args=(proc.stdout, WorkerOutput(slot.label), lines.queue,
                                  open(log_path, "w", encoding="utf-8", newline="")))
    pump.start()
    return proc, pump


def _failure(job, slot, proc, payload, log_dir, lines):
    """What a failed job's error says: its slot, exit code, last output lines, log, and how to re-run it alone
    (its payload is kept in log_dir for that)."""
    tail = [line[len(slot.label) + 3:] for line in lines.tails.get(slot.label, [])] or ["(no output)"]
    kept = log_dir / f"{_safe_name(job.label)}.pkl"  # the job, to re-run alone while debugging
    shutil.copyfile(payload, kept)
    rerun = f"python -m mcvqa worker {kept}" if _in_package() else f"run_worker_payload({str(kept)!r})"
    return (f"{job.label} failed on {slot.label} (worker exit code {proc.returncode}); "
            f"its last output lines:\n    " + "\n    ".join(tail)
            + f"\n  full log: {log_dir / (_safe_name(job.label) + '.log')}; re-run it alone: {rerun}")


def run_in_workers(jobs, slots, log_dir, echo=print):
    """Run each job in a fresh worker process, at most one per slot at a time, in job order as slots
    free up. Output lines are echoed prefixed with the slot ("[gpu 1] ..."). Returns the jobs' results
    in job order. A failed job stops new jobs from starting; the running ones finish (their outputs are
    kept), then WorkerError names every failed job with its slot, exit code and last output lines."""
    pickler = _pickler() or pickle
    if not _in_package() and pickler is pickle:
        raise RuntimeError("starting workers from a notebook needs cloudpickle (pip install cloudpickle)")
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="mcvqa_workers_"))
    lines = _WorkerLines(echo)
    pending = list(enumerate(jobs))
    free = list(slots)
    running = {}  # proc -> (index, job, slot, output pump thread, payload path)
    results, failures = [None] * len(jobs), []
    try:
        while running or (pending and not failures):
            while pending and free and not failures:
                index, job = pending.pop(0)
                slot = free.pop(0)
                payload = scratch / f"{index:03d}_{_safe_name(job.label)}.pkl"
                log_path = log_dir / f"{_safe_name(job.label)}.log"
                proc, pump = _start_worker(job, slot, payload, log_path, pickler, lines)
                running[proc] = (index, job, slot, pump, payload)
                lines.tails[slot.label] = []
                echo(f"[parallel] {job.label} started on {slot.label} (log: {log_path})")
            lines.show_queued(wait_s=0.2)
            for proc in [p for p in running if p.poll() is not None]:
                index, job, slot, pump, payload = running.pop(proc)
                pump.join()
                lines.show_queued()
                free.append(slot)
                result_path = pathlib.Path(f"{payload}.result")
                if proc.returncode == 0 and result_path.exists():
                    with open(result_path, "rb") as f:
                        results[index] = pickle.load(f)
                    echo(f"[parallel] {job.label} finished on {slot.label}")
                    continue
                failures.append(_failure(job, slot, proc, payload, log_dir, lines))
                echo(f"[parallel] {job.label} FAILED on {slot.label} (exit code {proc.returncode}); no new jobs "
                     f"start" + (f", waiting for {len(running)} running job(s) to finish" if running else ""))
    except BaseException:
        for proc in running:
            _stop(proc)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failures:
        not_started = [job.label for _, job in pending]
        raise WorkerError("\n".join(failures) + (f"\nnot started: {', '.join(not_started)}" if not_started else ""))
    return results
