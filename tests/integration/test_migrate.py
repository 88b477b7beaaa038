"""`resilient-cache migrate copy|verify` (plugins/dualwrite) from a real standalone Redis into the
real dev cluster: every type and TTL copied, Ctrl-C and resume, each kind of mismatch found, no
password, key or value where it must not be, and the sample.

The source is database 5 of the session's standalone server, flushed around each test; the
cluster is shared with other tests, so every key here starts with a prefix unique to the test,
and those keys are deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from resilient_cache_dualwrite.migrate import CopyState

from resilient_cache.cli import main
from tests.conftest import wait_until

SOURCE_DB = 5
TYPES = ("string", "hash", "list", "set", "zset", "stream")


@pytest.fixture
def source_url(standalone_redis: str) -> Iterator[str]:
    """Database 5 of the standalone server, empty at the start and at the end."""
    base = re.sub(r"/\d+$", "", standalone_redis)
    url = f"{base}/{SOURCE_DB}"
    with redis.Redis.from_url(url) as source:
        source.flushdb()
        yield url
        source.flushdb()


@pytest.fixture
def cluster(cluster_nodes: str) -> Iterator[RedisCluster]:
    nodes = [ClusterNode(*node.rsplit(":", 1)) for node in cluster_nodes.split(",")]
    client = RedisCluster(startup_nodes=nodes)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(cluster: RedisCluster) -> Iterator[str]:
    """A key prefix no other test uses (no braces: the keys spread over every slot); its keys
    are deleted from the cluster afterwards."""
    name = f"migrate:{uuid.uuid4().hex[:8]}:"
    yield name
    keys = cluster_keys(cluster, name)
    for start in range(0, len(keys), 1000):
        pipe = cluster.pipeline()
        for key in keys[start : start + 1000]:
            pipe.unlink(key)
        pipe.execute()


def cluster_keys(cluster: RedisCluster, prefix: str) -> list[bytes]:
    return list(cluster.scan_iter(match=f"{prefix}*", count=1000))


def fill(url: str, prefix: str, count: int) -> dict[str, int]:
    """``count`` keys of every type, binary keys and values among them; a third expire, with
    TTLs from 2 minutes to a day (none ends during a test), the rest do not. Pipelined."""
    draw = random.Random(count)
    expiring = 0
    with redis.Redis.from_url(url) as source:
        pipe = source.pipeline(transaction=False)
        for i in range(count):
            kind = TYPES[i % len(TYPES)]
            key = f"{prefix}{kind}:{i}".encode() + (b"\xff\x00" if i % 97 == 0 else b"")
            blob = draw.randbytes(draw.randrange(1, 64))
            if kind == "string":
                pipe.set(key, blob)
            elif kind == "hash":
                pipe.hset(key, mapping={b"a": blob, b"b": str(i), b"\xfe": b""})
            elif kind == "list":
                pipe.rpush(key, blob, b"x", blob)
            elif kind == "set":
                pipe.sadd(key, blob, b"y", str(i))
            elif kind == "zset":
                pipe.zadd(key, {blob: 1.5, b"m": i / 7, b"n": -2e10})
            else:
                pipe.xadd(key, {b"f": blob, b"g": b"1"})
            if i % 3 == 0:
                pipe.pexpire(key, draw.randrange(120_000, 86_400_000))
                expiring += 1
            if len(pipe) >= 5000:
                pipe.execute()
        pipe.execute()
        assert source.dbsize() == count
    return {"keys": count, "expiring": expiring}


def cli(*args: str) -> int:
    return main(["migrate", *args])


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_copy_every_type_then_verify_finds_no_mismatch(
    source_url, cluster_nodes, cluster, prefix, tmp_path, capsys, monkeypatch
) -> None:
    count = 50_000
    started = time.perf_counter()
    filled = fill(source_url, prefix, count)
    timing = [f"\nfilled {count:,} keys in {time.perf_counter() - started:.1f} s"]
    monkeypatch.setenv("REDIS_CLUSTER_NODES", cluster_nodes)  # the configured cluster
    state = tmp_path / "state.json"

    started = time.perf_counter()
    status = cli("copy", "--source", source_url, "--state", str(state))
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    timing.append(f"copied {count:,} keys in {seconds:.1f} s ({count / seconds:,.0f} keys/s)")
    assert status == 0, err
    assert last_line(out).startswith(f"copied {count:,} keys, "), out
    assert "Traceback" not in err
    assert not state.exists()  # removed once the copy went round
    assert len(cluster_keys(cluster, prefix)) == count

    # A few keys read directly, not through verify: the types and the TTLs came across.
    expiring = 0
    with redis.Redis.from_url(source_url) as source:
        for key in random.Random(1).sample(list(source.scan_iter(count=1000)), 60):
            assert cluster.type(key) == source.type(key)
            source_ttl, cluster_ttl = source.pttl(key), cluster.pttl(key)
            assert (source_ttl == -1) == (cluster_ttl == -1), key
            assert abs(source_ttl - cluster_ttl) < 10_000, key
            expiring += source_ttl > 0
    assert expiring and filled["expiring"] > count // 4

    started = time.perf_counter()
    status = cli("verify", "--source", source_url)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    timing.append(f"verified {count:,} keys in {seconds:.1f} s ({count / seconds:,.0f} keys/s)")
    with capsys.disabled():  # shown with -s
        print("\n".join(timing))
    assert status == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(
        f"checked {count:,} keys: 0 mismatches (missing 0, type 0, value 0, ttl 0) in "
    )


def test_interrupted_copy_resumes_where_it_stopped(
    source_url, cluster_nodes, cluster, prefix, tmp_path, capsys
) -> None:
    count = 20_000
    fill(source_url, prefix, count)
    state = tmp_path / "state.json"
    args = ["copy", "--source", source_url, "--state", str(state)]
    small_batches = ["--count", "100", "--progress-interval", "0"]  # many batches, every line
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env["REDIS_CLUSTER_NODES"] = cluster_nodes
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:  # a file: not a terminal, so progress comes as lines
        child = subprocess.Popen(
            [sys.executable, "-m", "resilient_cache", "migrate", *args, *small_batches],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        saved = wait_until(
            lambda: _state(state, with_cursor=True),
            timeout=60,
            what="the first batch copied (a state file with a cursor)",
            interval=0.01,
        )
        assert child.poll() is None, "the copy ended before it could be interrupted"
        assert saved["keys"] > 0 and "password" not in json.dumps(saved)
        child.send_signal(signal.SIGINT)
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stderr_text = errors.read_text()
    assert child.returncode == 130, stderr_text
    assert "Traceback" not in stderr_text
    assert re.search(r"^copied [\d,]+ keys \(", stderr_text, re.M)  # progress lines
    match = re.search(r"interrupted after ([\d,]+) keys; run the same command again", stderr_text)
    assert match, stderr_text
    interrupted_at = int(match[1].replace(",", ""))
    saved = _state(state)
    assert saved["keys"] == interrupted_at and saved["cursor"] != 0
    assert 0 < len(cluster_keys(cluster, prefix)) <= interrupted_at < count

    status = cli(*args, "--nodes", cluster_nodes)  # batches of another size: the cursor holds
    out, err = capsys.readouterr()
    assert status == 0, err
    assert re.match(r"copied [\d,]+ keys \([\d,]+ with the runs before\), ", out), out
    assert f"resuming from cursor {saved['cursor']} ({interrupted_at:,} keys copied before)" in err
    assert not state.exists()
    assert len(cluster_keys(cluster, prefix)) == count
    assert cli("verify", "--source", source_url, "--nodes", cluster_nodes) == 0
    assert " 0 mismatches " in capsys.readouterr().out


def test_failed_restores_exit_1_and_a_rerun_retries_them(
    source_url, cluster_nodes, cluster, prefix, tmp_path, capsys, monkeypatch
) -> None:
    """RESTOREs failing after the client's retries (the chaos plugin's CLUSTERDOWN, outside
    the retry stage, on 30% of the RESTORE pipelines) are counted, not named; the state file
    never gets past a batch that failed, so running the command again copies the rest."""
    count = 3000
    fill(source_url, prefix, count)
    state = tmp_path / "state.json"
    args = ["copy", "--source", source_url, "--nodes", cluster_nodes, "--state", str(state)]
    chaos = {
        "REDIS_STAGES": "metrics,chaos,timeout,retry,routing,breaker",
        "REDIS_CHAOS__ENABLED": "true",
        "REDIS_CHAOS__COMMANDS": '["PIPELINE"]',  # a draw per RESTORE pipeline, in order
        "REDIS_CHAOS__RATE": "0.3",
        "REDIS_CHAOS__SEED": "5",  # draws: the first 6 pipelines (3 batches) pass, the 7th fails
        "REDIS_CHAOS__FAULT": "clusterdown",
    }
    for name, value in chaos.items():
        monkeypatch.setenv(name, value)
    status = cli(*args, "--count", "200", "--concurrency", "2", "--max-failures", "0")
    out, err = capsys.readouterr()
    assert status == 1, err
    copied = int(re.match(r"copied ([\d,]+) keys, ", out)[1].replace(",", ""))
    failed = re.search(r"migrate: ([\d,]+) RESTOREs failed \(the first: ClusterDownError: ", err)
    assert failed, err
    assert copied + int(failed[1].replace(",", "")) == count
    assert len(cluster_keys(cluster, prefix)) == copied < count
    assert prefix not in out + err  # counted, not named
    saved = _state(state)  # after the 3rd batch: the later ones that passed do not count
    assert saved is not None and 0 < saved["keys"] < copied and saved["cursor"] != 0, saved

    for name in chaos:
        monkeypatch.delenv(name)
    assert cli(*args) == 0
    resumed = f"resuming from cursor {saved['cursor']} ({saved['keys']:,} keys copied before)"
    assert resumed in capsys.readouterr().err
    assert not state.exists()
    assert len(cluster_keys(cluster, prefix)) == count
    assert cli("verify", "--source", source_url, "--nodes", cluster_nodes) == 0


def _state(path: Path, with_cursor: bool = False) -> dict | None:
    """The state file's content; None while there is none (with ``with_cursor``: none with a
    cursor other than 0). It is replaced whole, never seen half-written."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return state if state["cursor"] or not with_cursor else None


def test_verify_reports_each_kind_of_mismatch_without_values(
    source_url, cluster_nodes, cluster, prefix, tmp_path, capsys
) -> None:
    secret = "canary-value-7f3a"
    names = {kind: f"{prefix}{kind}-canary-key" for kind in ("missing", "type", "value", "ttl")}
    with redis.Redis.from_url(source_url) as source:
        source.set(names["missing"], secret)
        source.hset(names["type"], mapping={"f": secret})
        source.rpush(names["value"], secret, "b")
        source.set(names["ttl"], secret, px=600_000)
        for i in range(50):  # and keys that stay equal
            source.set(f"{prefix}same:{i}", secret, px=600_000 if i % 2 else None)
    nodes = ["--nodes", cluster_nodes]
    state = tmp_path / "state.json"
    assert cli("copy", "--source", source_url, *nodes, "--state", str(state)) == 0
    cluster.delete(names["missing"])
    cluster.delete(names["type"])
    cluster.set(names["type"], secret)  # a string now
    cluster.rpush(names["value"], f"{secret}-changed")
    cluster.pexpire(names["ttl"], 900_000)  # 5 minutes off
    capsys.readouterr()

    status = cli("verify", "--source", source_url, *nodes)
    out, err = capsys.readouterr()
    assert status == 1, out + err
    lines = out.strip().splitlines()
    assert lines[-1].startswith(
        "checked 54 keys: 4 mismatches (missing 1, type 1, value 1, ttl 1) in "
    )
    found = {line.split()[0]: line for line in lines[:-1]}
    assert sorted(found) == ["missing", "ttl", "type", "value"], out
    for kind, name in names.items():
        assert hashlib.sha256(name.encode()).hexdigest()[:12] in found[kind]
    assert found["missing"].endswith("source string, no ttl; cluster no such key")
    assert found["type"].endswith("source hash, no ttl; cluster string, no ttl")
    assert re.search(r"source string, ttl 59\d\.\ds; cluster string, ttl 89\d\.\ds$", found["ttl"])
    assert secret not in out + err and prefix not in out + err  # no value, no key

    status = cli("verify", "--source", source_url, *nodes, "--show-keys", "--max-report", "2")
    out, err = capsys.readouterr()
    assert status == 1
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[2] == "(2 more mismatches not shown: see --max-report)"
    assert sum(repr(name) in out for name in names.values()) == 2  # keys shown when asked
    assert secret not in out + err  # values never

    # After a fresh copy (REPLACE), nothing differs.
    assert cli("copy", "--source", source_url, *nodes, "--state", str(state)) == 0
    assert cli("verify", "--source", source_url, *nodes) == 0


def test_bad_input_is_one_line(
    source_url, standalone_redis, cluster_nodes, cluster, prefix, tmp_path, capsys
) -> None:
    nodes = ["--nodes", cluster_nodes]
    state = tmp_path / "state.json"
    for bad in ("http://127.0.0.1:6379/0", "127.0.0.1:6379", "redis://:s3cret-canary@h:port/0"):
        for action in (["copy", "--state", str(state)], ["verify"]):
            assert cli(*action, "--source", bad, *nodes) == 2, bad
            out, err = capsys.readouterr()
            assert len(err.strip().splitlines()) == 1 and "--source" in err, err
            assert "s3cret-canary" not in out + err

    unreachable = "redis://:s3cret-canary@127.0.0.1:1/0"
    for action in (["copy", "--state", str(state)], ["verify"]):
        assert cli(*action, "--source", unreachable, *nodes) == 1
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "resilient-cache: migrate: cannot reach the source redis://***@127.0.0.1:1/0: "
            "ConnectionError: "
        ), err
        assert "Traceback" not in err and "s3cret-canary" not in out + err

    with redis.Redis.from_url(source_url) as source:
        source.set(f"{prefix}a", "1")
    other = CopyState("redis://***@10.9.8.7:6379/0", "10.9.8.7", 6379, 0, None, None, 7, 10, 99)
    state.write_text(json.dumps({"version": 1, **dataclasses.asdict(other)}))
    assert cli("copy", "--source", source_url, *nodes, "--state", str(state)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "is for another copy (source redis://***@10.9.8.7:6379/0)" in err
    assert "--restart" in err
    # --restart ignores it, copies, and removes it.
    assert cli("copy", "--source", source_url, *nodes, "--state", str(state), "--restart") == 0
    assert not state.exists() and cluster.get(f"{prefix}a") == b"1"

    # The source given as the target: refused, since a verify would then prove nothing.
    host_port = re.sub(r"^redis://|/\d+$", "", standalone_redis)
    assert cli("verify", "--source", source_url, "--nodes", host_port) == 2
    assert "is one of the cluster's own nodes" in capsys.readouterr().err


def test_verify_sample_checks_that_many_keys(
    source_url, cluster_nodes, cluster, prefix, tmp_path, capsys
) -> None:
    fill(source_url, prefix, 600)
    nodes = ["--nodes", cluster_nodes]
    assert cli("copy", "--source", source_url, *nodes, "--state", str(tmp_path / "s")) == 0
    capsys.readouterr()
    assert cli("verify", "--source", source_url, *nodes, "--sample", "50") == 0
    assert capsys.readouterr().out.startswith("checked 50 keys: 0 mismatches ")
    assert cli("verify", "--source", source_url, *nodes, "--sample", "5000") == 0
    assert capsys.readouterr().out.startswith("checked 600 keys: 0 mismatches ")

    # With every key gone from the cluster, each key drawn is a mismatch: the sample is real.
    for key in cluster_keys(cluster, prefix):
        cluster.unlink(key)
    assert cli("verify", "--source", source_url, *nodes, "--sample", "40", "--count", "7") == 1
    out = capsys.readouterr().out
    assert "checked 40 keys: 40 mismatches (missing 40, type 0, value 0, ttl 0)" in out
    assert len(out.strip().splitlines()) == 20 + 2  # --max-report's default, the rest counted
