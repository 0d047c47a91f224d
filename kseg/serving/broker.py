"""The Redis side of queued serving (`kseg serve --broker`, `kseg worker`): key names, the binary
tensor codec, and the few atomic operations front ends and workers share.

Layout on the broker (one Redis database; PREFIX is "kseg"):

    PREFIX:req:NAME:VERSION     a Stream of requests to one model version; consumer group "workers"
    PREFIX:res:REQUEST_ID       a List the answer is pushed to (the front end waits on it with BLPOP)
    PREFIX:alive:NAME           a sorted set "VERSION|WORKER" scored by heartbeat expiry (Redis clock, ms)
    PREFIX:meta:NAME:VERSION    a Hash signature name -> serialized SignatureDef

A request is one stream entry: its id, the signature, the deadline (ms after the entry's own
timestamp, so only Redis' clock is read) and the input tensors in the codec below. A worker reads
entries with XREADGROUP, so each entry belongs to one worker until acknowledged; the answer is
written by a script that pushes it, acknowledges and deletes the entry in one step, and only while
that worker still owns the entry: a request taken over from a worker presumed dead is answered
once. Entries of a worker whose heartbeat has expired are claimed (XCLAIM) by the living ones.

Tensors travel as bytes, not JSON: a small JSON header (name, dtype, shape, and for strings the
length of each element) followed by the raw buffers, so an encoded image costs its own size.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from kseg.serving.errors import ServingError

PREFIX = "kseg"
GROUP = "workers"
MAGIC = b"KSG1"


def request_stream(name, version):
    return f"{PREFIX}:req:{name}:{version}"


def result_key(request_id):
    return f"{PREFIX}:res:{request_id}"


def alive_key(name):
    return f"{PREFIX}:alive:{name}"


def meta_key(name, version):
    return f"{PREFIX}:meta:{name}:{version}"


def connect(url):
    """A redis.Redis client for URL (redis://HOST:PORT/DB) that retries through a dropped connection."""
    import redis  # the serving extra
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--broker must be a redis:// URL such as redis://127.0.0.1:6379/0, got {url!r}")
    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                socket_connect_timeout=2.0, health_check_interval=10)


# === codec ====================================================================================


def encode(arrays, **fields) -> bytes:
    """{name: ndarray} plus JSON-able fields -> bytes; string tensors as their raw elements."""
    header, buffers = {"fields": fields, "arrays": []}, []
    for name, array in arrays.items():
        array = np.asarray(array)
        entry = {"name": name, "shape": list(array.shape)}
        if array.dtype.kind in "OSU":
            items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
            entry.update(dtype="string", lengths=[len(v) for v in items])
            buffers.extend(items)
        else:
            data = np.ascontiguousarray(array)
            entry["dtype"] = data.dtype.str
            buffers.append(data.tobytes())
        header["arrays"].append(entry)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *buffers])


def decode(data):
    """bytes -> ({name: ndarray}, fields); string tensors come back as object arrays of bytes."""
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC:
        raise ValueError("not a kseg broker message")
    (size,) = struct.unpack("<I", data[4:8])
    header = json.loads(bytes(data[8:8 + size]))
    offset, arrays = 8 + size, {}
    for entry in header["arrays"]:
        shape = tuple(entry["shape"])
        if entry["dtype"] == "string":
            flat = np.empty(len(entry["lengths"]), dtype=object)
            for i, n in enumerate(entry["lengths"]):
                flat[i] = bytes(data[offset:offset + n])
                offset += n
            arrays[entry["name"]] = flat.reshape(shape)
        else:
            dtype = np.dtype(entry["dtype"])
            n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            arrays[entry["name"]] = np.frombuffer(data[offset:offset + n], dtype=dtype).reshape(shape).copy()
            offset += n
    return arrays, header["fields"]


def encode_error(error: ServingError) -> bytes:
    return encode({}, error={"code": error.code, "message": error.message})


def decode_result(data):
    """A worker's answer -> outputs, or raise its ServingError."""
    outputs, fields = decode(data)
    if "error" in fields:
        raise ServingError(fields["error"]["code"], fields["error"]["message"])
    return outputs


# === scripts (atomic on the broker) ===========================================================

# KEYS: stream, result list. ARGV: group, consumer, entry id, payload, ttl ms.
# Answer only while this consumer owns the entry: push, expire, acknowledge, delete.
ANSWER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: alive set. ARGV: ttl ms, members... Each member's expiry = Redis' now + ttl.
HEARTBEAT = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expires, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', expires - 600000)
return expires
"""

# KEYS: alive set. Members whose heartbeat has not expired, with Redis' now (ms) as the last item.
ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
table.insert(members, tostring(now))
return members
"""


def redis_now_ms(client):
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def entry_time_ms(entry_id):
    """The Redis clock time (ms) at which a stream entry was added, from its auto-generated id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])
