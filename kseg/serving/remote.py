"""The front end of queued serving (`kseg serve --broker`): BrokerManager answers the REST and gRPC
front ends exactly as ModelManager does, but runs nothing itself.

A request is checked against the signature a worker published (names, dtypes, shapes: a bad one
gets its 4xx here and never reaches the queue), its tensors are encoded as bytes and appended to
the stream of the model version a live worker serves (the highest one when the URL names none),
and the front end waits on the request's own answer list until --request-timeout: then 504. No
live worker for the model: 503 at once. The broker unreachable (after a few reconnection
attempts): 503. Models and versions are the ones workers announce by heartbeat; status reports a
version AVAILABLE only while one is alive.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time

from kseg.serving import broker as wire
from kseg.serving.errors import ServingError
from kseg.serving.models import ServableBase
from kseg.serving.signatures import Signature

log = logging.getLogger("kseg.serving")

# KEYS: stream. ARGV: max entries, then field, value pairs. Refuses (returns false) when the stream is full.
ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""


class RemoteServable(ServableBase):
    """A model version served by workers: the signatures they published; predict goes through the queue."""

    def __init__(self, manager, name, version, signature_defs):
        self.manager, self.name, self.version = manager, name, version
        self.signature_defs = signature_defs
        # All of them for metadata, as TF Serving reports; requests only to callable ones (not __saved_model_init_op).
        self.signatures = {k: Signature(k, None, v) for k, v in signature_defs.items() if not k.startswith("__")}

    def predict(self, signature, arrays):
        arrays, _ = signature.prepare(arrays)
        return self.manager.call(self.name, self.version, signature.name, arrays)


class BrokerManager:
    """ModelManager's interface (acquire, predict, model_status) over a Redis broker."""

    ALIVE_CACHE_SECONDS = 0.25

    def __init__(self, broker, *, request_timeout=30.0, max_queued=4096):
        self.url = broker if isinstance(broker, str) else "the broker"
        self.client = wire.connect(broker) if isinstance(broker, str) else broker
        self.request_timeout = float(request_timeout)
        self.max_queued = int(max_queued)
        self._enqueue = self.client.register_script(ENQUEUE)
        self._alive_script = self.client.register_script(wire.ALIVE)
        self._alive_cache = {}  # name -> (monotonic time, {version: set(workers)})
        self._signatures = {}  # (name, version) -> SignatureDef map (a version's signatures never change)

    def start(self):
        # Parsing signatures needs TensorFlow's protos; imported now, not by concurrent first requests.
        from tensorflow.core.protobuf import meta_graph_pb2  # noqa: F401

        try:
            self.client.ping()
        except Exception as e:  # noqa: BLE001 - requests get 503 until it is back
            log.warning("broker %s unreachable at start (%s); requests get 503 until it answers", self.url, e)
        return self

    def stop(self):
        self.client.close()

    def summary(self):
        return f"those the workers on {self.url} announce"

    # --- what the workers serve ---

    @contextlib.contextmanager
    def _broker(self):
        import redis

        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise ServingError("UNAVAILABLE", f"the broker {self.url} is unreachable ({e})") from None

    def alive(self, name):
        """{version: set of worker names} with a live heartbeat for model `name`."""
        now = time.monotonic()
        cached = self._alive_cache.get(name)
        if cached and now - cached[0] < self.ALIVE_CACHE_SECONDS:
            return cached[1]
        with self._broker():
            members = self._alive_script(keys=[wire.alive_key(name)])[:-1]
        versions = {}
        for member in members:
            version, _, worker = member.decode().partition("|")
            versions.setdefault(int(version), set()).add(worker)
        self._alive_cache[name] = (now, versions)
        return versions

    def _known_versions(self, name):
        with self._broker():
            keys = list(self.client.scan_iter(match=wire.meta_key(name, "*"), count=1000))
        return sorted({int(k.decode().rsplit(":", 1)[1]) for k in keys if k.decode().rsplit(":", 1)[1].isdigit()})

    def _signature_defs(self, name, version):
        key = (name, version)
        if key not in self._signatures:
            from tensorflow.core.protobuf import meta_graph_pb2

            with self._broker():
                stored = self.client.hgetall(wire.meta_key(name, version))
            if not stored:
                raise ServingError("UNAVAILABLE", f"model {name} version {version} has published no signatures")
            self._signatures[key] = {k.decode(): meta_graph_pb2.SignatureDef.FromString(v) for k, v in stored.items()}
        return self._signatures[key]

    @contextlib.contextmanager
    def acquire(self, name, version=None):
        """The servable a live worker serves (the highest version when `version` is None)."""
        versions = self.alive(name)
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        if version is None and versions:
            version = max(versions)
        if version not in versions:
            known = self._known_versions(name)
            if (version is None and known) or version in known:
                raise ServingError("UNAVAILABLE", f"no live kseg worker serves {request} (start one with "
                                                  f"kseg worker BASE --broker ...)")
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
        yield RemoteServable(self, name, version, self._signature_defs(name, version))

    def predict(self, name, version, signature_name, arrays):
        with self.acquire(name, version) as servable:
            signature = servable.signature(signature_name)
            return servable.version, signature.name, servable.predict(signature, arrays)

    def call(self, name, version, signature_name, arrays):
        """Enqueue one checked request and wait for its answer (outputs), or raise its error."""
        request_id = secrets.token_hex(16)
        timeout_ms = int(self.request_timeout * 1000)
        payload = wire.encode(arrays, signature=signature_name)
        stream = wire.request_stream(name, version)
        with self._broker():
            added = self._enqueue(keys=[stream], args=[self.max_queued, "id", request_id, "timeout_ms", timeout_ms,
                                                       "payload", payload])
            if not added:
                raise ServingError("UNAVAILABLE", f"the queue of {name} version {version} is full "
                                                  f"({self.max_queued} requests waiting)")
            reply = self.client.blpop([wire.result_key(request_id)], timeout=self.request_timeout)
        if reply is None:
            raise ServingError("DEADLINE_EXCEEDED", f"no worker answered within {self.request_timeout:g} s "
                                                    f"(model {name} version {version}; the workers are busy or "
                                                    "stopped)")
        return wire.decode_result(reply[1])

    def model_status(self, name, version=None):
        alive = self.alive(name)
        known = set(self._known_versions(name)) | set(alive)
        if version is not None:
            if version not in known:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
            known = {version}
        if not known:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        ok = {"error_code": "OK", "error_message": ""}
        down = {"error_code": "UNAVAILABLE", "error_message": "no live kseg worker serves this version"}
        return [{"version": str(v), "state": "AVAILABLE" if v in alive else "END",
                 "status": ok if v in alive else down} for v in sorted(known, reverse=True)]
