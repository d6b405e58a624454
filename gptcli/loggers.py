"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) as sinks of the training metrics.

``train.loggers: [tensorboard, wandb, mlflow]`` feeds the trackers users already look at;
``metrics.jsonl`` is always written and stays the record. Each tracker receives the resolved
config and ``run.json`` as parameters, every numeric field of every metrics record against
``step`` (named ``train/loss``, ``eval/val_loss``, ...; nested dicts as ``a/b``), the epoch
samples as text and ``losses.png`` as an image.

A tracker never hurts the run. The trackers run in their own process (``python -m
gptcli.loggers``, in a session of its own, so a Ctrl-C or a closed terminal reaches only
training, which then closes them): their Python work never competes with the training loop
for the interpreter's lock, and a tracker that crashes its process cannot take training with
it. The training loop only enqueues calls, which a sender thread writes to the process's
stdin as JSON lines (never pickle: nothing gptcli reads can run code). Inside it, each
tracker runs on its own daemon thread behind a bounded queue. Any exception (an extra not
installed, no login, network down, disk full) or a call that takes longer than
``train.logger_timeout`` drops that tracker with one warning, and training goes on; so
does the death of the whole tracker process. Warnings are delivered on the training thread,
at its next call. If training itself is killed, the tracker process sees its stdin
close and ends the tracker runs as failed.

A resumed run continues the same tracker run: the TensorBoard folder, the W&B run id and the
MLflow run id are kept in ``RUN/loggers.json`` (written durably before and after each tracker
opens, so the run directory's recognition of gptcli's own files never misses a tracker folder).
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import secrets
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gptcli.fsio import atomic_write, read_json_object
from gptcli.errors import first_line

STATE_FILE = "loggers.json"  # tracker ids of this run (see resolve.RUN_FILES)
DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # RUN/<dir> each tracker writes
QUEUE_SIZE = 1000  # calls a tracker may lag behind before the loop waits (at most train.logger_timeout)
BATCH = 50  # metrics records at most in one tracker call (MLflow takes 1000 values per batch)
PROJECT = "gptcli"  # W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record as ``{event}/{key}`` (nested dicts: ``{event}/{key}/{sub}``).

    ``step`` is the x-axis, not a metric; strings, booleans, None and lists are not metrics.
    """
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    event = record.get("event", "metrics")
    for key, value in record.items():
        if key not in ("event", "step"):
            walk(f"{event}/{key}", value)
    return out


RUN_END_KEYS = ("state", "ended_at", "signal", "error")  # run.json's record of how the run ended (rundir.py)


def params(config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The resolved config (``model.emb_dim``, ...) and run.json (``run.corpus/sha256``, ...), flat.

    Strings, numbers and booleans stay as they are; lists and None become JSON text.
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}/{k}" if "." in prefix else f"{prefix}.{k}", v)
        else:
            out[prefix] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)

    for section, values in config.items():
        walk(section, values)
    # How the run ends (state, ended_at, signal, error) is not a parameter: it changes as the run goes.
    walk("run", {k: v for k, v in manifest.items() if k not in RUN_END_KEYS})
    return out


CHILD = [sys.executable, "-m", "gptcli.loggers"]  # the tracker process's command (its one argument follows)


class Trackers:
    """The trackers of one run (rank 0 only), in their own process: a metric sink (write/close)
    plus start, text and image.

    Args:
        names: ``train.loggers``; none: no process is started and every call does nothing.
        run_dir: the run directory (tracker folders and loggers.json go there).
        timeout: ``train.logger_timeout``: seconds one tracker call may take before it is dropped.
        warn: where the one warning per dropped tracker (and each tracker's notes) go.
        resumed: continue the tracker runs named in ``RUN/loggers.json``.
    """

    def __init__(self, names, run_dir: Path, timeout: float, warn: Callable[[str], None], resumed: bool):
        self._names = list(names)
        self._warn = warn
        self._timeout = timeout
        self._step = 0
        self._notes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._outbox: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._failure: str | None = None  # why the tracker process was given up (said once)
        self._closed = threading.Event()  # the tracker process has closed every tracker (or is gone)
        self._proc: subprocess.Popen | None = None
        if not self._names:
            return
        spec = {"names": self._names, "run_dir": str(Path(run_dir).resolve()), "timeout": timeout, "resumed": resumed}
        try:
            # a session of its own: the terminal's signals (Ctrl-C, SIGHUP) go to training, which closes it
            self._proc = subprocess.Popen([*CHILD, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          start_new_session=True)
        except OSError as e:
            self._give_up(f"cannot start the tracker process ({e.strerror or e})")
            return
        for target in (self._send, self._receive):
            threading.Thread(target=target, args=(self._proc,), name=f"gptcli-trackers{target.__name__}",
                             daemon=True).start()

    def start(self, config: dict[str, Any], manifest: dict[str, Any], step: int) -> None:
        """Open each tracker (resuming its run at `step` when resumed) and give it the config and run.json."""
        self._step = step
        self._call("start", config, manifest, step)

    def write(self, record: dict[str, Any]) -> None:
        """One metrics record (as metrics.jsonl gets it): its numbers against its step."""
        self._step = record.get("step", self._step)
        self._call("write", record)

    def text(self, tag: str, text: str) -> None:
        self._call("text", tag, text, self._step)

    def image(self, tag: str, path: Path) -> None:
        """A PNG (read here: the file may be redrawn before the tracker process gets to it)."""
        if self._live():
            try:
                data = path.read_bytes()
            except OSError:
                return  # no plot drawn (yet): nothing to show
            self._call("image", tag, base64.b64encode(data).decode("ascii"), self._step)

    def close(self, ok: bool | None = None) -> None:
        """Flush and close every tracker (`ok`: the run ended well, else it is marked failed or stopped;
        None: whether no exception is in flight) and wait for the tracker process to end; a tracker
        that does not finish within its timeout is abandoned. A second call does nothing."""
        if ok is None:
            ok = sys.exc_info()[0] is None  # called from a `finally` while an error or a signal stops the run
        if self._proc is None:
            self._check()
            return
        self._call("close", ok)
        try:
            while not self._closed.wait(0.05):  # short waits: a signal still reaches the training thread
                pass
            self._proc.wait()
        except BaseException:
            self._proc.kill()
            raise
        finally:
            self._check()
            self._proc = None

    def _live(self) -> bool:
        return self._proc is not None and self._failure is None

    def _call(self, method: str, *args: Any) -> None:
        if self._live():
            try:
                self._outbox.put((method, args), timeout=self._timeout)
            except queue.Full:
                self._give_up(f"{QUEUE_SIZE} calls behind for longer than train.logger_timeout ({self._timeout:g} s)")
        self._check()

    def _give_up(self, why: str) -> None:
        if self._failure is None:
            self._failure = why
            self._notes.put(f"train.loggers: {', '.join(self._names)}: {why}; dropped "
                            f"{'it' if len(self._names) == 1 else 'them'}, training goes on "
                            "(metrics.jsonl has every record)")
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._closed.set()

    def _check(self) -> None:
        """Say what the tracker process noted (tracker notes, one warning per dropped tracker)."""
        _drain(self._notes, self._warn)

    def _send(self, proc: subprocess.Popen) -> None:
        """Sender thread: the queued calls, one JSON line each into the tracker process's stdin."""
        stream = proc.stdin
        while True:
            method, args = self._outbox.get()
            try:
                stream.write(json.dumps([method, args]).encode("utf-8") + b"\n")
                stream.flush()
                if method == "close":
                    stream.close()
                    return
            except (OSError, ValueError):
                return  # the process is gone: _receive says why

    def _receive(self, proc: subprocess.Popen) -> None:
        """Receiver thread: the tracker process's notes, one JSON object per line, until it ends."""
        said_closed = False
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "warn" in message:
                self._notes.put(message["warn"])
            said_closed = said_closed or bool(message.get("closed"))
        code = proc.wait()
        if not said_closed:
            self._give_up(f"the tracker process ended (exit code {code})")
        self._closed.set()


class _Hub:
    """The trackers of one run, inside the tracker process: one ``_Worker`` thread per tracker.

    Args: as ``Trackers``; `warn` sends a note to the training process.
    """

    def __init__(self, names, run_dir: Path, timeout: float, warn: Callable[[str], None], resumed: bool):
        self.run_dir = run_dir
        self._warn = warn
        self._notes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        saved = read_state(run_dir) if resumed else {}
        self._resumed = resumed
        self._step = 0
        self._workers = [
            _Worker(name, FACTORIES[name], (run_dir, saved.get(name), self._remember_for(name), self._notes.put),
                    timeout)
            for name in names
        ]

    def start(self, config: dict[str, Any], manifest: dict[str, Any], step: int) -> None:
        self._step = step
        self._call("open", step if self._resumed else None)
        self._call("params", params(config, manifest))

    def write(self, record: dict[str, Any]) -> None:
        self._step = record.get("step", self._step)
        self._call("metrics", self._step, flatten(record))

    def text(self, tag: str, text: str, step: int) -> None:
        self._call("text", step, tag, text)

    def image(self, tag: str, png_base64: str, step: int) -> None:
        self._call("image", step, tag, base64.b64decode(png_base64))

    def close(self, ok: bool) -> None:
        """Flush and close every tracker; one that does not finish within its timeout is abandoned."""
        for w in self._workers:
            w.submit("close", ok)
        for w in self._workers:
            w.join()
        self._check()
        self._workers = []

    def _call(self, method: str, *args: Any) -> None:
        for w in self._workers:
            w.submit(method, *args)
        self._check()

    def _check(self) -> None:
        """Say what the trackers noted, and drop (with one warning) each that failed or hangs."""
        _drain(self._notes, self._warn)
        for w in [w for w in self._workers if w.failure or w.hung()]:
            self._workers.remove(w)
            self._warn(f"train.loggers: {w.name}: {w.failure or w.hang_message()}; dropped it, training goes on "
                       f"(metrics.jsonl has every record)")

    def _remember_for(self, name: str) -> Callable[[dict[str, Any]], None]:
        def remember(info: dict[str, Any]) -> None:
            with self._lock:
                state = read_state(self.run_dir)
                state[name] = {**state.get(name, {}), **info}
                atomic_write(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

        return remember


def _drain(notes: queue.SimpleQueue, say: Callable[[str], None]) -> None:
    """Hand every queued note to `say`, in order."""
    while True:
        try:
            say(notes.get_nowait())
        except queue.Empty:
            return


def read_state(run_dir: Path) -> dict[str, Any]:
    """RUN/loggers.json ({} when absent or unreadable)."""
    return read_json_object(run_dir / STATE_FILE)


class _Worker:
    """One tracker on its own daemon thread; the training thread only enqueues calls.

    The first exception in a call ends the thread (``failure`` says why). A call running longer
    than `timeout` makes ``hung()`` true. A full queue makes ``submit`` wait at most `timeout`.
    """

    def __init__(self, name: str, factory, args: tuple, timeout: float):
        self.name = name
        self.timeout = timeout
        self.failure: str | None = None
        self._busy: tuple[str, float] | None = None  # (method, monotonic start) of the running call
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._factory, self._args = factory, args
        self._thread = threading.Thread(target=self._run, name=f"gptcli-logger-{name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> None:
        if self.failure or self.hung():
            return
        try:
            self._queue.put((method, args), timeout=self.timeout)
        except queue.Full:
            self.failure = (f"{QUEUE_SIZE} calls behind for longer than train.logger_timeout "
                            f"({self.timeout:g} s)")

    def hung(self) -> bool:
        busy = self._busy
        return busy is not None and time.monotonic() - busy[1] > self.timeout

    def hang_message(self) -> str:
        what = self._busy[0] if self._busy else "a call"
        return f"{what} took longer than train.logger_timeout ({self.timeout:g} s)"

    def join(self) -> None:
        """Wait for the queue to drain and the tracker to close, or for a call to hang."""
        while self._thread.is_alive() and not self.failure and not self.hung():
            self._thread.join(0.05)

    def _run(self) -> None:
        tracker, pending = None, None
        while True:
            method, args = pending or self._queue.get()
            pending = None
            if method == "metrics":  # records that queued up while the tracker was busy go in one call
                points = [args]
                while len(points) < BATCH and pending is None:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item[0] == "metrics":
                        points.append(item[1])
                    else:
                        pending = item
                args = (points,)
            self._busy = (method, time.monotonic())
            try:
                if method == "open":
                    tracker = self._factory(*self._args, *args)
                elif tracker is not None:  # never opened (the run stopped before its start): nothing to do
                    getattr(tracker, method)(*args)
            except BaseException as e:  # noqa: BLE001 - any failure of a tracker drops it, never the run
                self.failure = _describe(self.name, e)
                self._busy = None
                return
            self._busy = None
            if method == "close":
                return


def _describe(name: str, e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"not installed ({first_line(e)}); pip install 'gptcli[{name}]'"
    return f"{type(e).__name__}: {first_line(e)}"


# ---------------------------------------------------------------- the trackers
# Each opens in __init__(run_dir, saved, remember, note, resume_step) on its thread, then gets
# params(dict), metrics([(step, dict), ...]), text(step, tag, str), image(step, tag, png bytes), close().


class TensorBoard:
    """RUN/tensorboard event files; a resumed run appends to the same folder, purging steps after the checkpoint."""

    def __init__(self, run_dir: Path, saved, remember, note, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        remember({"dir": DIRS["tensorboard"]})

        # purge_step: TensorBoard hides events at or after it that an earlier session wrote
        # (a run killed after its last checkpoint logged those steps once already).
        self.writer = SummaryWriter(log_dir=str(run_dir / DIRS["tensorboard"]),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        self.step = resume_step or 0

    def params(self, values: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, self.step)

    def metrics(self, points: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in points:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, step: int, tag: str, png: bytes) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = _png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)  # 4: RGBA
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run in RUN/wandb; offline (never a login prompt) when no credentials are found."""

    def __init__(self, run_dir: Path, saved, remember, note, resume_step: int | None):
        import wandb

        remember({"dir": DIRS["wandb"]})

        run_id = (saved or {}).get("run_id") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                         for _ in range(8))  # W&B's own id format
        remember({"run_id": run_id})
        mode = os.environ.get("WANDB_MODE")  # the user's choice wins, except one that would prompt for a login
        if mode not in ("offline", "dryrun", "disabled") and not _wandb_credentials():
            mode = "offline"  # for this init only, not the process's environment
            note(f"train.loggers: wandb: no credentials (WANDB_API_KEY or `wandb login`): logging offline to "
                 f"{run_dir / DIRS['wandb']}; upload later with: wandb sync {run_dir / DIRS['wandb']}/offline-run-*")
        # console="off": our stdout/stderr stay ours (W&B would wrap them); silent: no banner on them.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.wandb = wandb

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)  # a resume may change train.max_steps etc.

    def metrics(self, points: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in points:
            self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        import html

        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def image(self, step: int, tag: str, png: bytes) -> None:
        import io

        from PIL import Image

        self.run.log({tag: self.wandb.Image(Image.open(io.BytesIO(png)))}, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (or $NETRC) for the W&B host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MLflow:
    """An MLflow run: MLFLOW_TRACKING_URI when set, else a local store in RUN/mlflow (SQLite and artifacts)."""

    def __init__(self, run_dir: Path, saved, remember, note, resume_step: int | None):
        import logging

        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        for chatty in ("mlflow.store.db.utils", "alembic"):  # their INFO lines about creating the SQLite tables
            logging.getLogger(chatty).setLevel(logging.WARNING)
        saved = saved or {}
        local = run_dir / DIRS["mlflow"]
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            remember({"dir": DIRS["mlflow"]})
            local.mkdir(exist_ok=True)
            # SQLite: MLflow 3 refuses its plain-file store unless MLFLOW_ALLOW_FILE_STORE is set.
            uri = f"sqlite:///{(local / 'mlflow.db').resolve()}"

        self.client, self.Metric, self.Param = MlflowClient(tracking_uri=uri), Metric, Param
        run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            exp = self.client.get_experiment_by_name(name)
            artifacts = (local / "artifacts").resolve().as_uri() if not os.environ.get("MLFLOW_TRACKING_URI") else None
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifacts)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            remember({"tracking_uri": uri, "run_id": run_id})
            note(f"train.loggers: mlflow: run {run_id} in {uri}"
                 + ("" if os.environ.get("MLFLOW_TRACKING_URI") else " (set MLFLOW_TRACKING_URI to use a server)"))
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.resume_step = resume_step

    def params(self, values: dict[str, Any]) -> None:
        # A parameter is written once in MLflow: a value a resume changed goes in a tag named after the step.
        values = {k: str(v) for k, v in values.items()}
        logged = self.client.get_run(self.run_id).data.params
        new = [self.Param(k[:250], v[:6000]) for k, v in values.items() if k[:250] not in logged]
        changed = {f"resumed-at-step-{self.resume_step}.{k}"[:250]: v[:5000] for k, v in values.items()
                   if k[:250] in logged and logged[k[:250]] != v[:6000]}
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        for key, value in changed.items():
            self.client.set_tag(self.run_id, key, value)

    def metrics(self, points: list[tuple[int, dict[str, float]]]) -> None:
        now = int(time.time() * 1000)
        batch = [self.Metric(k, v, now, step) for step, values in points for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:06d}.txt")

    def image(self, step: int, tag: str, png: bytes) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{tag}.png"
            path.write_bytes(png)
            self.client.log_artifact(self.run_id, str(path))  # the latest plot, replaced at each evaluation

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")  # a resume sets RUNNING again


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


FACTORIES: dict[str, Callable[..., Any]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


# ---------------------------------------------------------------- the tracker process


def serve(spec: dict[str, Any], commands, notes) -> None:
    """The tracker process's loop: `commands` (a binary stream of JSON lines [method, args]) drive one
    ``_Hub``; its notes go to `notes` as JSON lines. Ends at "close", or at the end of `commands`
    (training was killed: the tracker runs end as failed)."""
    lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with lock:
            try:
                notes.write(json.dumps(message) + "\n")
                notes.flush()
            except (OSError, ValueError):
                pass  # training is gone: nobody to tell

    hub = _Hub(spec["names"], Path(spec["run_dir"]), spec["timeout"], lambda m: send({"warn": m}), spec["resumed"])
    ok = False
    for line in commands:
        try:
            method, args = json.loads(line)
        except ValueError:  # a torn last line: training died while writing it
            break
        if method == "close":
            ok = args[0]
            break
        getattr(hub, method)(*args)
    hub.close(ok)
    send({"closed": True})


def main() -> None:
    """``python -m gptcli.loggers SPEC``: the tracker process (started by ``Trackers``)."""
    notes = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the notes channel: the parent's pipe
    try:  # what the tracker libraries print goes to stderr, never into the notes channel
        os.dup2(2, 1)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    serve(json.loads(sys.argv[1]), sys.stdin.buffer, notes)
    os._exit(0)  # the thread of a tracker that hangs must not hold the exit


if __name__ == "__main__":
    main()
