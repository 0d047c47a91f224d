"""Models and versions for kseg serve: Servable (one loaded version), ModelState, discover (BASE's
NAME/VERSION directories) and ModelManager (loads, hot-swaps and unloads versions; serves requests)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time

from kseg.serving.batching import Batcher
from kseg.serving.errors import DEFAULT_SIGNATURE, ServingError
from kseg.serving.signatures import Signature, read_signature_defs

log = logging.getLogger("kseg.serving")


class ServableBase:
    """A model version's signatures by name (Servable here, RemoteServable behind a broker)."""

    name = version = None
    signatures = {}

    def signature(self, name):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise ServingError("INVALID_ARGUMENT", f'Serving signature name: "{name}" not found in signature def '
                                                   f"(model {self.name} version {self.version} has "
                                                   f"{', '.join(sorted(self.signatures))})")
        return self.signatures[name]


class Servable(ServableBase):
    """One loaded version of a model: its signatures, batchers and in-flight request count."""

    def __init__(self, name, version, path, batching):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path)
        self._loaded = tf.saved_model.load(path)
        self.signatures = {k: Signature(k, self._loaded.signatures[k], v) for k, v in self.signature_defs.items()
                           if k in self._loaded.signatures}
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no signatures to serve")
        self._batching = batching
        self._batchers = {}
        self._lock = threading.Lock()
        self.inflight = 0
        self.retired = False

    def predict(self, signature, arrays):
        arrays, rows = signature.prepare(arrays)
        if rows is None or self._batching["max_batch_size"] <= 1:
            return signature.run(arrays)
        with self._lock:
            batcher = self._batchers.get(signature.name)
            if batcher is None:
                batcher = self._batchers[signature.name] = Batcher(signature, **self._batching)
        return batcher.submit(arrays, rows)

    def unload(self):
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.stop()
        self.signatures = {}
        self._loaded = None


class ModelState:
    """A model name: its served version and the status of every version seen."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.current = None
        self.status = {}  # version -> (state, error_code, error_message)
        self.failures = collections.Counter()
        self.lock = threading.Lock()


def discover(base):
    """{model name: {version: path}} under BASE (BASE/NAME/VERSION, or BASE/VERSION for one model)."""
    def versions(directory):
        found = {}
        try:
            names = os.listdir(directory)
        except OSError:
            return found
        for n in names:
            p = os.path.join(directory, n)
            if n.isdigit() and (os.path.isfile(os.path.join(p, "saved_model.pb"))):
                found[int(n)] = p
        return found

    models = {}
    own = versions(base)
    if own:
        models[os.path.basename(os.path.abspath(base))] = own
    for n in sorted(os.listdir(base)):
        p = os.path.join(base, n)
        if not n.startswith(".") and os.path.isdir(p) and not n.isdigit():
            v = versions(p)
            if v:
                models[n] = v
    return models


class ModelManager:
    """Loads the highest version of every model under BASE and follows new versions by polling."""

    MAX_LOAD_ATTEMPTS = 3

    def __init__(self, base, *, poll_seconds=1.0, max_batch_size=32, batch_timeout=0.002, num_batch_threads=1,
                 max_queued_rows=4096):
        base = os.fspath(base)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"{base}: no such model base directory (expected BASE/NAME/VERSION/saved_model.pb)")
        self.base = base
        self.poll_seconds = poll_seconds
        self.batching = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout,
                         "num_threads": num_batch_threads, "max_queued_rows": max_queued_rows}
        self.models = {}
        self._models_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # --- lifecycle ---

    def start(self):
        self.poll()
        if not self.models:
            log.warning("no models under %s yet (expected NAME/VERSION/saved_model.pb); waiting for one", self.base)
        if self.poll_seconds and self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="kseg-model-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for state in list(self.models.values()):
            with state.lock:
                current, state.current = state.current, None
            if current is not None:
                current.unload()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("polling %s failed", self.base)

    def poll(self):
        """Load the highest version of each model where it is not the one served."""
        for name, versions in discover(self.base).items():
            with self._models_lock:
                state = self.models.get(name)
                if state is None:
                    state = self.models[name] = ModelState(name, os.path.dirname(next(iter(versions.values()))))
            latest = max(versions)
            current = state.current
            if current is not None and current.version == latest:
                continue
            if state.failures[latest] >= self.MAX_LOAD_ATTEMPTS or self._stop.is_set():
                continue
            self._load(state, latest, versions[latest])

    def _load(self, state, version, path):
        with state.lock:
            state.status[version] = ("LOADING", "OK", "")
        start = time.perf_counter()
        try:
            servable = Servable(state.name, version, path, self.batching)
        except Exception as e:  # noqa: BLE001 - a broken version must not stop the server
            state.failures[version] += 1
            final = state.failures[version] >= self.MAX_LOAD_ATTEMPTS
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            with state.lock:
                state.status[version] = ("END" if final else "LOADING", "UNKNOWN", message)
            log.error("model %s version %d failed to load (attempt %d): %s", state.name, version,
                      state.failures[version], message)
            return
        with state.lock:
            old, state.current = state.current, servable
            state.status[version] = ("AVAILABLE", "OK", "")
            if old is not None:
                old.retired = True
                state.status[old.version] = ("UNLOADING", "OK", "")
                idle = old.inflight == 0
        log.info("model %s version %d loaded in %.1f s from %s", state.name, version, time.perf_counter() - start, path)
        if old is not None and idle:
            self._unload(state, old)

    def _unload(self, state, servable):
        servable.unload()
        with state.lock:
            state.status[servable.version] = ("END", "OK", "")
        log.info("model %s version %d unloaded", state.name, servable.version)

    def summary(self):
        """'NAME vV, ...' of the versions served now."""
        return ", ".join(f"{n} v{s.current.version}" for n, s in sorted(self.models.items())
                         if s.current is not None) or "none yet"

    # --- requests ---

    def state(self, name):
        state = self.models.get(name)
        if state is None:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return state

    @contextlib.contextmanager
    def acquire(self, name, version=None):
        """The servable for a request; it stays loaded until the request is done."""
        state = self.models.get(name)
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        if state is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
        with state.lock:
            servable = state.current
            if servable is None or (version is not None and servable.version != version):
                raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
            servable.inflight += 1
        try:
            yield servable
        finally:
            with state.lock:
                servable.inflight -= 1
                done = servable.retired and servable.inflight == 0 and servable.signatures
            if done:
                self._unload(state, servable)

    def predict(self, name, version, signature_name, arrays):
        """Numpy inputs -> (version served, signature name, numpy outputs) through the batcher."""
        with self.acquire(name, version) as servable:
            signature = servable.signature(signature_name)
            return servable.version, signature.name, servable.predict(signature, arrays)

    def model_status(self, name, version=None):
        state = self.state(name)
        with state.lock:
            items = sorted(state.status.items(), reverse=True)
        if version is not None:
            items = [(v, s) for v, s in items if v == version]
            if not items:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        return [{"version": str(v), "state": s, "status": {"error_code": code, "error_message": message}}
                for v, (s, code, message) in items]
