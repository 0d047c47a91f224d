"""`kseg worker BASE --broker redis://...`: a model process of queued serving.

It loads BASE's models as `kseg serve` does (highest version of each, hot reload by polling), pulls
up to --max-batch-size rows of requests at once from each served version's stream, runs them as
one call per signature and input shape, writes each answer back and acknowledges it (one atomic
step, kseg.serving.broker.ANSWER). Any number of workers on any number of machines share the
streams through the consumer group. A heartbeat every --heartbeat-seconds announces each served
version (front ends report AVAILABLE from it and send requests only where a worker is alive);
the requests a worker had taken when it died are claimed by a living one once its heartbeat
expires, and a request that has already been taken by --max-deliveries workers is answered with
an error instead of being tried again (so one request that crashes workers cannot stop them all).

    >>> from kseg.serving.worker import Worker                        # doctest: +SKIP
    >>> with Worker("models", "redis://127.0.0.1:6379/0"):            # serves until the block ends
    ...     ...
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time

from kseg.serving import broker as wire
from kseg.serving.batching import Task, batch_key, execute
from kseg.serving.errors import ServingError
from kseg.serving.models import ModelManager

log = logging.getLogger("kseg.serving")


class Worker:
    """Pulls requests for BASE's models from the broker, runs them in batches, answers them."""

    DRAIN_QUIET_SECONDS = 1.0  # longer than a front end trusts a heartbeat it read (BrokerManager's cache)

    def __init__(self, base, broker, *, max_batch_size=8, batch_timeout_ms=2.0, poll_seconds=1.0,
                 heartbeat_seconds=1.0, max_deliveries=3, name=None):
        self.manager = ModelManager(base, poll_seconds=poll_seconds, max_batch_size=1)  # batches are ours
        self.url = broker if isinstance(broker, str) else None
        self.client = wire.connect(broker) if isinstance(broker, str) else broker
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_timeout = max(0.0, batch_timeout_ms / 1000.0)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.max_deliveries = int(max_deliveries)
        self._answer = self.client.register_script(wire.ANSWER)
        self._heartbeat = self.client.register_script(wire.HEARTBEAT)
        self._alive = self.client.register_script(wire.ALIVE)
        self._groups = set()
        self._announced = {}  # model name -> member announced in its alive set
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._quiet = threading.Event()  # draining and nothing arrived for DRAIN_QUIET_SECONDS
        self._threads = []
        self._broker_down = False
        self.batches = self.answered = self.reclaimed = 0

    # --- lifecycle ---

    def start(self):
        self.manager.start()
        for target, name in ((self._beat_loop, "kseg-worker-heartbeat"), (self._loop, "kseg-worker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, grace=30.0):
        """Drain: withdraw the heartbeats (front ends stop sending), answer what arrives until the
        streams are quiet for DRAIN_QUIET_SECONDS, finish the batch in hand, unload the models."""
        self._draining.set()
        try:
            for model, member in self._announced.items():
                self.client.zrem(wire.alive_key(model), member)
        except Exception as e:  # noqa: BLE001 - the broker may be gone; the heartbeats then expire alone
            log.warning("could not withdraw worker %s's heartbeats: %s", self.name, e)
        if self._threads:
            self._quiet.wait(grace)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=grace)
        try:
            for stream in self._groups:
                mine = [c for c in self.client.xpending(stream, wire.GROUP)["consumers"]
                        if _text(c["name"]) == self.name]
                if not mine or not mine[0]["pending"]:
                    self.client.xgroup_delconsumer(stream, wire.GROUP, self.name)
        except Exception as e:  # noqa: BLE001 - the broker may be gone; the heartbeats then expire alone
            log.warning("could not withdraw worker %s from the broker: %s", self.name, e)
        self.manager.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- what this worker serves ---

    def _served(self):
        """{stream key: (model name, version)} of every model with a loaded version."""
        served = {}
        for name, state in list(self.manager.models.items()):
            current = state.current
            if current is not None:
                served[wire.request_stream(name, current.version)] = (name, current.version)
        return served

    def _beat_loop(self):
        while not self._draining.is_set():
            try:
                self._beat()
                if self._broker_down:
                    log.info("broker reachable again")
                self._broker_down = False
            except Exception as e:  # noqa: BLE001 - keep beating through broker restarts
                self._broker_unreachable(e)
            self._draining.wait(self.heartbeat_seconds)

    def _beat(self):
        ttl_ms = int(self.heartbeat_seconds * 3000) + 500
        for name, state in list(self.manager.models.items()):
            current = state.current
            if current is None:
                continue
            member = f"{current.version}|{self.name}"
            old = self._announced.get(name)
            if old is not None and old != member:
                self.client.zrem(wire.alive_key(name), old)
            meta = wire.meta_key(name, current.version)
            with self.client.pipeline() as pipe:  # the signatures first, so a front end never sees a version
                pipe.hset(meta, mapping={k: v.SerializeToString() for k, v in current.signature_defs.items()})
                pipe.pexpire(meta, 7 * 24 * 3600 * 1000)
                pipe.execute()
            self._heartbeat(keys=[wire.alive_key(name)], args=[ttl_ms, member])
            self._announced[name] = member

    def _broker_unreachable(self, error):
        if not self._broker_down:
            log.warning("broker unreachable (%s: %s); retrying", type(error).__name__, error)
        self._broker_down = True
        self._groups.clear()  # a restarted broker has lost the consumer groups

    # --- the request loop ---

    def _loop(self):
        import redis

        last_reclaim = last_entry = 0.0
        drain_started = None
        while not self._stop.is_set():
            if self._draining.is_set():
                drain_started = drain_started or time.monotonic()
                if time.monotonic() - max(last_entry, drain_started) > self.DRAIN_QUIET_SECONDS:
                    self._quiet.set()
                    return
            served = self._served()
            if not served:
                self._stop.wait(0.1)
                continue
            try:
                self._ensure_groups(served)
                if time.monotonic() - last_reclaim > self.heartbeat_seconds and not self._draining.is_set():
                    last_reclaim = time.monotonic()
                    self._reclaim(served)
                for stream, entries in self._read(served):
                    last_entry = time.monotonic()
                    self._process(served[stream], stream, entries)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    self._groups.clear()
                else:
                    log.exception("broker error")
                    self._stop.wait(0.5)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._broker_unreachable(e)
                self._stop.wait(0.5)
            except Exception:  # noqa: BLE001 - a worker keeps serving
                log.exception("worker loop error")
                self._stop.wait(0.5)

    def _ensure_groups(self, served):
        import redis

        for stream in served:
            if stream not in self._groups:
                try:  # from id 0: entries queued before the group existed are served too
                    self.client.xgroup_create(stream, wire.GROUP, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
                self._groups.add(stream)

    def _read(self, served):
        """[(stream, entries)] of up to max_batch_size new entries, waiting batch_timeout for more."""
        streams = dict.fromkeys(served, ">")
        got = self.client.xreadgroup(wire.GROUP, self.name, streams, count=self.max_batch_size, block=200)
        if not got:
            return []
        merged = collections.defaultdict(list)
        for stream, entries in got:
            merged[_text(stream)].extend(entries)
        deadline = time.monotonic() + self.batch_timeout
        while sum(map(len, merged.values())) < self.max_batch_size:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = self.client.xreadgroup(wire.GROUP, self.name, streams, block=left_ms,
                                          count=self.max_batch_size - sum(map(len, merged.values())))
            if not more:
                break
            for stream, entries in more:
                merged[_text(stream)].extend(entries)
        return list(merged.items())

    def _reclaim(self, served):
        """Claim the entries held by consumers without a live heartbeat, and answer them."""
        for stream, (model, version) in served.items():
            summary = self.client.xpending(stream, wire.GROUP)
            if not summary["pending"]:
                continue
            alive = {m.split("|", 1)[1] for m in map(_text, self._alive(keys=[wire.alive_key(model)])[:-1])}
            for consumer in summary["consumers"]:
                dead = _text(consumer["name"])
                if dead == self.name or dead in alive:
                    continue
                pending = self.client.xpending_range(stream, wire.GROUP, min="-", max="+", count=1000,
                                                     consumername=dead, idle=1000)
                if not pending:
                    continue
                deliveries = {_text(p["message_id"]): p["times_delivered"] for p in pending}
                claimed = self.client.xclaim(stream, wire.GROUP, self.name, min_idle_time=1000,
                                             message_ids=list(deliveries))
                claimed = [(i, f) for i, f in claimed if f]  # deleted entries come back empty
                if claimed:
                    self.reclaimed += len(claimed)
                    log.warning("took over %d request(s) of %s on %s v%s (no heartbeat)", len(claimed), dead,
                                model, version)
                    self._process((model, version), stream, claimed, deliveries)

    # --- running a batch ---

    def _process(self, where, stream, entries, deliveries=None):
        """Run and answer stream entries; whatever goes wrong, each entry gets an answer."""
        requests = [_Request(stream, entry_id, fields) for entry_id, fields in entries]
        try:
            with self.manager.acquire(*where) as servable:
                self._run(servable, requests, deliveries or {})
        except Exception as e:  # noqa: BLE001 - never strand a request this worker holds
            error = e if isinstance(e, ServingError) else ServingError("INTERNAL", f"{type(e).__name__}: {e}")
            if error.code == "NOT_FOUND":  # unloaded since the read (a newer version took over)
                error = ServingError("UNAVAILABLE", error.message)
            for request in requests:
                if not request.answered:
                    self._reply(request, error=error)
            if error.code == "INTERNAL":
                raise

    def _run(self, servable, requests, deliveries):
        now = wire.redis_now_ms(self.client)
        tasks = collections.defaultdict(list)  # (signature, batch key) -> [(request, task)]
        for request in requests:
            if request.timeout_ms and now > wire.entry_time_ms(request.entry_id) + request.timeout_ms:
                log.warning("request %s expired in the queue; dropped", request.id)
                self._ack(request)
                continue
            taken = deliveries.get(request.entry_id, 0)
            if taken >= self.max_deliveries:
                self._reply(request, error=ServingError("INTERNAL", f"the request was taken by {taken} workers "
                                                                    "that stopped before answering it; not retried"))
                continue
            try:
                arrays, meta = wire.decode(request.fields["payload"])
                signature = servable.signature(meta.get("signature"))
                arrays, rows = signature.prepare(arrays)
            except ServingError as e:
                self._reply(request, error=e)
                continue
            except (KeyError, ValueError) as e:
                self._reply(request, error=ServingError("INVALID_ARGUMENT", f"undecodable request: {e}"))
                continue
            key = (signature.name, batch_key(arrays) if rows is not None else request.entry_id)
            tasks[key].append((request, Task(arrays, rows or 0, key)))
        for (name, _), group in tasks.items():
            for chunk in self._chunks(group):
                calls, _ = execute(servable.signature(name), [task for _, task in chunk])
                self.batches += calls
                for request, task in chunk:
                    self._reply(request, outputs=task.result, error=task.error)

    def _chunks(self, group):
        chunk, rows = [], 0
        for item in group:
            task = item[1]
            if chunk and rows + task.rows > self.max_batch_size:
                yield chunk
                chunk, rows = [], 0
            chunk.append(item)
            rows += task.rows
        if chunk:
            yield chunk

    def _reply(self, request, *, outputs=None, error=None):
        payload = wire.encode_error(error) if error is not None else wire.encode(outputs)
        ttl = (request.timeout_ms or 60000) + 10000  # nobody reads it after the front end's deadline
        request.answered = True
        if self._answer(keys=[request.stream, wire.result_key(request.id)],
                        args=[wire.GROUP, self.name, request.entry_id, payload, ttl]):
            self.answered += 1
        else:
            log.warning("request %s was taken over by another worker; its answer stands", request.id)

    def _ack(self, request):
        request.answered = True
        with self.client.pipeline() as pipe:
            pipe.xack(request.stream, wire.GROUP, request.entry_id)
            pipe.xdel(request.stream, request.entry_id)
            pipe.execute()


class _Request:
    """One stream entry: where it is, its request id and timeout, its fields; answered yet?"""

    __slots__ = ("answered", "entry_id", "fields", "id", "stream", "timeout_ms")

    def __init__(self, stream, entry_id, fields):
        self.stream, self.entry_id = stream, _text(entry_id)
        self.fields = {_text(k): v for k, v in fields.items()}
        self.id = _text(self.fields.get("id", b"?"))
        self.timeout_ms = int(self.fields.get("timeout_ms", 0) or 0)
        self.answered = False


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def work(base, broker, *, ready_file=None, **options):
    """Run `kseg worker` in the foreground until SIGTERM/SIGINT (then drain); returns the exit code."""
    import json

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    worker = Worker(base, broker, **options)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.start()
        print(f"kseg worker {worker.name}: serving {worker.manager.summary()} from {broker}", flush=True)
        if ready_file:
            with open(ready_file, "w") as f:
                json.dump({"name": worker.name, "pid": os.getpid()}, f)
        while not stop.wait(0.5):
            pass
        log.info("shutting down: finishing the batch in hand")
        worker.stop()
        log.info("stopped (%d requests answered, %d taken over)", worker.answered, worker.reclaimed)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
