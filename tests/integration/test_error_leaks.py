"""No command argument in any error the client raises, nor in anything chained to it.

Design section 5: every error names the command, the node, its class and Redis's error code, and
never shows a key, a value or a password: not in ``str()``, not in ``repr()``, not in the full
chained traceback, not in any ``__cause__`` / ``__context__`` down the chain. Each case below
makes Redis or redis-py produce an error that quotes its arguments (a canary value, a canary key,
a canary password of a real ACL user the client also logs in with) and checks all of that, on the
cluster and on a standalone server.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.exceptions import (
    AuthenticationError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from resilient_cache import RedisClusterClient, ResilientCacheError, create_redis_cluster
from resilient_cache.backends.redis_py_errors import translate_batch_error
from resilient_cache.devcluster import DevCluster
from resilient_cache.errors import RedisCommandError
from resilient_cache.pipeline import batch_command

CANARY = "canary-VALUE-7f3a"
PASSWORD = "canary-PASS-e19c"
WRONG_PASSWORD = PASSWORD + "-wrong"
USER = "leak-errors-user"
SECRETS = (CANARY, PASSWORD)
#: A key that is itself a canary, in one slot (hash tag) so that transactions can use it.
KEY = f"{{leak}}:{CANARY}"
OTHER_KEY = "{leak}:number"


# -- what "no leak" means ----------------------------------------------------------------------


def chain_of(err: BaseException) -> list[BaseException]:
    """``err`` and everything chained to it, through ``__cause__`` and ``__context__``."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += (current.__cause__, current.__context__)
    return seen


def assert_no_secret(err: BaseException) -> None:
    shown = ["".join(traceback.format_exception(type(err), err, err.__traceback__, chain=True))]
    shown += traceback.TracebackException(type(err), err, err.__traceback__).format(chain=True)
    for link in chain_of(err):
        shown += [str(link), repr(link), repr(link.args), *map(str, getattr(link, "__notes__", ()))]
    text = "\n".join(shown)
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} shown by {type(err).__name__}:\n{text}"


def assert_names(err: BaseException, command: str, code: str | None, node: str | None) -> None:
    """Names the command, the node (when one answered), its class and Redis's error code."""
    assert isinstance(err, RedisCommandError), f"{type(err)}: {err}"
    assert isinstance(err, ResilientCacheError)
    assert err.command == command, str(err)
    assert command in str(err), str(err)
    assert err.redis_code == code, str(err)
    if code is not None:
        assert str(err).startswith(code + " "), str(err)
    assert err.original_type == type(err).__qualname__
    if node is not None:
        assert err.node == node, str(err)
        assert node in str(err), str(err)
    assert err.__cause__ is None and err.__context__ is None and err.__suppress_context__


# -- the two deployments -------------------------------------------------------------------------


@dataclass
class Deployment:
    client: RedisClusterClient
    cluster: bool
    #: ``target_nodes=`` for keyless commands on the cluster, and its name.
    target: Any
    target_name: str | None
    #: The node owning KEY ("host:port").
    key_node: str
    #: Where MIGRATE sends KEY: a server on which USER exists (with PASSWORD).
    migrate_to: tuple[str, int]


@pytest.fixture
def leak_user(devcluster: DevCluster, standalone_redis: str) -> Iterator[None]:
    """USER with PASSWORD on every cluster node and on the standalone server (removed after)."""
    rule = ("on", f">{PASSWORD}", "~*", "&*", "+@all")
    admins = [devcluster.admin(node) for node in devcluster.nodes]
    standalone = redis.Redis.from_url(standalone_redis)
    for admin in [*admins, standalone]:
        admin.execute_command("ACL", "SETUSER", USER, *rule)
    try:
        yield
    finally:
        for admin in [*admins, standalone]:
            admin.execute_command("ACL", "DELUSER", USER, "leak-errors-tmp")
        standalone.close()


@pytest.fixture
async def on_cluster(
    cluster_nodes: str, leak_user: None, standalone_redis: str
) -> AsyncIterator[Deployment]:
    client = create_redis_cluster(
        cluster_nodes, autoload=False, health_check_interval=0, username=USER, password=PASSWORD
    )
    async with client:
        raw = client.get_cluster()
        await client.set(KEY, CANARY)
        owner = raw.get_node_from_key(KEY)
        single = redis.asyncio.Redis.from_url(standalone_redis)
        host = single.connection_pool.connection_kwargs["host"]
        port = single.connection_pool.connection_kwargs["port"]
        await single.aclose()
        yield Deployment(client, True, owner, owner.name, owner.name, (host, port))
        await client.execute_command("DEL", KEY, OTHER_KEY)


@pytest.fixture
async def on_standalone(
    standalone_redis: str, devcluster: DevCluster, leak_user: None
) -> AsyncIterator[Deployment]:
    client = create_redis_cluster(
        url=standalone_redis,
        autoload=False,
        health_check_interval=0,
        username=USER,
        password=PASSWORD,
    )
    assert client.backend.name == "standalone"
    async with client:
        await client.set(KEY, CANARY)
        ((host, port),) = client.backend.known_nodes()
        target = devcluster.nodes[0]
        migrate_to = (target.host, target.port)
        yield Deployment(client, False, None, None, f"{host}:{port}", migrate_to)
        await client.execute_command("DEL", KEY, OTHER_KEY)


# -- single commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``call(deployment)`` fails; on the cluster / standalone server, with these expectations:
    (error class, command named, Redis error code, node: "key", "target" or None)."""

    call: Callable[[Deployment], Awaitable[Any]]
    cluster: tuple[type[BaseException], str, str | None, str | None] | None
    standalone: tuple[type[BaseException], str, str | None, str | None] | None


def _targeted(d: Deployment) -> dict[str, Any]:
    return {"target_nodes": d.target} if d.cluster else {}


def _eval(script: str) -> Callable[[Deployment], Awaitable[Any]]:
    return lambda d: d.client.execute_command("EVAL", script, 1, KEY, CANARY)


SCRIPT = "EVAL"
REPLY = ResponseError

CASES: dict[str, Case] = {
    "unknown command": Case(
        lambda d: d.client.execute_command("NOTACOMMAND", CANARY, KEY),
        # redis-py refuses it itself on the cluster (no reply: no Redis code).
        (RedisError, "NOTACOMMAND", None, None),
        (REPLY, "NOTACOMMAND", "ERR", "key"),
    ),
    "unknown command, target_nodes": Case(
        lambda d: d.client.execute_command("NOTACOMMAND", CANARY, KEY, **_targeted(d)),
        (REPLY, "NOTACOMMAND", "ERR", "target"),
        None,
    ),
    "unknown subcommand": Case(
        lambda d: d.client.execute_command("CLIENT", CANARY),
        (RedisClusterException, "CLIENT", None, None),
        (REPLY, "CLIENT", "ERR", "key"),
    ),
    "unknown subcommand, target_nodes": Case(
        lambda d: d.client.execute_command("CLIENT", CANARY, **_targeted(d)),
        (REPLY, "CLIENT", "ERR", "target"),
        None,
    ),
    "wrong AUTH": Case(
        lambda d: d.client.execute_command("AUTH", USER, WRONG_PASSWORD),
        (AuthenticationError, "AUTH", "WRONGPASS", None),
        (AuthenticationError, "AUTH", "WRONGPASS", "key"),
    ),
    "HELLO 3 AUTH": Case(
        lambda d: d.client.execute_command("HELLO", "3", "AUTH", USER, WRONG_PASSWORD),
        (RedisClusterException, "HELLO", None, None),
        (AuthenticationError, "HELLO", "WRONGPASS", "key"),
    ),
    "HELLO 3 AUTH, target_nodes": Case(
        lambda d: d.client.execute_command(
            "HELLO", "3", "AUTH", USER, WRONG_PASSWORD, **_targeted(d)
        ),
        (AuthenticationError, "HELLO", "WRONGPASS", "target"),
        None,
    ),
    "ACL SETUSER bad rule": Case(
        lambda d: d.client.execute_command("ACL", "SETUSER", "leak-errors-tmp", CANARY),
        (RedisClusterException, "ACL", None, None),
        (REPLY, "ACL", "ERR", "key"),
    ),
    "ACL SETUSER bad rule, target_nodes": Case(
        lambda d: d.client.execute_command(
            "ACL", "SETUSER", "leak-errors-tmp", f">{PASSWORD}", CANARY, **_targeted(d)
        ),
        (REPLY, "ACL", "ERR", "target"),
        None,
    ),
    "CONFIG SET value": Case(
        lambda d: d.client.execute_command("CONFIG", "SET", "maxmemory", CANARY, **_targeted(d)),
        (REPLY, "CONFIG", "ERR", "target"),
        (REPLY, "CONFIG", "ERR", "key"),
    ),
    "CONFIG SET parameter": Case(
        lambda d: d.client.execute_command("CONFIG", "SET", CANARY, "1", **_targeted(d)),
        (REPLY, "CONFIG", "ERR", "target"),
        (REPLY, "CONFIG", "ERR", "key"),
    ),
    "CONFIG SET, no target": Case(
        lambda d: d.client.execute_command("CONFIG", "SET", CANARY, PASSWORD),
        (RedisClusterException, "CONFIG", None, None),
        (REPLY, "CONFIG", "ERR", "key"),
    ),
    "MIGRATE AUTH2": Case(
        lambda d: d.client.execute_command(
            "MIGRATE",
            *d.migrate_to,
            "",
            0,
            5000,
            "AUTH2",
            USER,
            WRONG_PASSWORD,
            "KEYS",
            KEY,
        ),
        (REPLY, "MIGRATE", "ERR", "key"),
        (REPLY, "MIGRATE", "ERR", "key"),
    ),
    "EVAL error_reply(ARGV)": Case(
        _eval("return redis.error_reply(ARGV[1])"),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL error(ARGV)": Case(
        _eval("error(ARGV[1] .. ' and ' .. KEYS[1])"),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL error(KEYS), the key alone": Case(
        # The key is shown whole, unquoted, separators and all; no other argument is the canary.
        lambda d: d.client.execute_command("EVAL", "error('no: ' .. KEYS[1])", 1, KEY),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL error in the script's source": Case(
        _eval(f"error('{CANARY}')"),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL compile error": Case(
        _eval(f"return {CANARY}("),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL redis.call quoting the canary": Case(
        _eval("return redis.call('OBJECT', ARGV[1], KEYS[1])"),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "EVAL redis.call with the canary": Case(
        _eval("return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[1])"),
        (REPLY, SCRIPT, "ERR", "key"),
        (REPLY, SCRIPT, "ERR", "key"),
    ),
    "WRONGTYPE": Case(
        lambda d: d.client.lpush(KEY, CANARY),
        (REPLY, "LPUSH", "WRONGTYPE", "key"),
        (REPLY, "LPUSH", "WRONGTYPE", "key"),
    ),
}


def _node(d: Deployment, which: str | None) -> str | None:
    if not d.cluster:
        return d.key_node  # one server answers everything
    return {"key": d.key_node, "target": d.target_name, None: None}[which]


async def _check(d: Deployment, case: Case) -> None:
    expected = case.cluster if d.cluster else case.standalone
    assert expected is not None, "a case without an expectation here is not parametrized"
    error_class, command, code, node = expected
    with pytest.raises(error_class) as caught:
        await case.call(d)
    err = caught.value
    assert_no_secret(err)
    assert_names(err, command, code, _node(d, node))
    if d.cluster and error_class is RedisClusterException:
        assert "arguments not shown" in str(err)


@pytest.mark.parametrize("name", list(CASES))
async def test_cluster_errors_never_show_an_argument(on_cluster: Deployment, name: str) -> None:
    await _check(on_cluster, CASES[name])


# Cases with target_nodes= exist only on the cluster: they are not generated for a single server.
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.standalone])
async def test_standalone_errors_never_show_an_argument(
    on_standalone: Deployment, name: str
) -> None:
    await _check(on_standalone, CASES[name])


# -- pipelines and transactions ------------------------------------------------------------------


@pytest.fixture(params=["cluster", "standalone"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    return request.getfixturevalue(f"on_{request.param}")


async def test_pipeline_error_names_the_failed_command_not_its_arguments(
    deployment: Deployment,
) -> None:
    d = deployment
    async with d.client.pipeline() as pipe:
        pipe.get(KEY).execute_command("SET", KEY, CANARY, "EX", "notanumber")
        with pytest.raises(ResponseError) as caught:
            await pipe.execute()
    err = caught.value
    assert_no_secret(err)
    assert_names(err, "SET", "ERR", d.key_node)
    assert (err.batch, err.position) == ("PIPELINE", 2)
    assert "command #2 of the pipeline" in str(err)


async def test_pipeline_with_a_wrong_auth(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline()
    pipe.set(KEY, CANARY).execute_command("AUTH", USER, WRONG_PASSWORD)
    with pytest.raises(AuthenticationError) as caught:
        await pipe.execute()
    err = caught.value
    assert_no_secret(err)
    if d.cluster:  # the failed command is known; AUTH has no key: redis-py picks the node
        assert_names(err, "AUTH", "WRONGPASS", None)
        assert err.position == 2
    else:  # the standalone pipeline raises a failed AUTH at once, not knowing which
        assert_names(err, "PIPELINE", "WRONGPASS", d.key_node)


async def test_pipeline_with_an_unknown_command(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline()
    pipe.execute_command("NOTACOMMAND", CANARY, KEY, **_targeted(d))
    with pytest.raises(ResponseError) as caught:
        await pipe.execute()
    err = caught.value
    assert_no_secret(err)
    assert_names(err, "NOTACOMMAND", "ERR", d.target_name if d.cluster else d.key_node)
    assert err.position == 1


async def test_errors_returned_by_a_pipeline_are_retold_too(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline()
    pipe.get(KEY).execute_command("CLIENT", CANARY, **_targeted(d)).incr(KEY)
    replies = await pipe.execute(raise_on_error=False)
    assert replies[0] == CANARY.encode()
    subcommand, incr = replies[1], replies[2]
    for reply in (subcommand, incr):
        assert isinstance(reply, ResponseError)
        assert_no_secret(reply)
    assert_names(subcommand, "CLIENT", "ERR", d.target_name if d.cluster else d.key_node)
    assert_names(incr, "INCRBY", "ERR", d.key_node)  # redis-py's incr()
    assert (subcommand.position, incr.position) == (2, 3)


async def test_transaction_error_at_exec(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline(transaction=True)
    pipe.set(OTHER_KEY, 1).incr(KEY)  # KEY holds the canary: not an integer
    with pytest.raises(ResponseError) as caught:
        await pipe.execute()
    err = caught.value
    assert_no_secret(err)
    assert_names(err, "INCRBY", "ERR", d.key_node)  # redis-py's incr()
    assert (err.batch, err.position) == ("MULTI", 2)
    assert "command #2 of the transaction" in str(err)


async def test_transaction_error_when_queued(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline(transaction=True)
    pipe.set(OTHER_KEY, 1).execute_command("GET", KEY, CANARY)  # wrong number of arguments
    with pytest.raises(ResponseError) as caught:
        await pipe.execute()
    err = caught.value
    assert_no_secret(err)
    assert_names(err, "GET", "ERR", d.key_node)
    assert err.position == 2


async def test_transaction_with_a_keyless_command(deployment: Deployment) -> None:
    d = deployment
    pipe = d.client.pipeline(transaction=True)
    pipe.set(KEY, CANARY).execute_command("CLIENT", CANARY)
    if d.cluster:  # redis-py cannot place it in the transaction's slot, and says so
        with pytest.raises(RedisClusterException) as caught:
            await pipe.execute()
        assert_no_secret(caught.value)
        assert_names(caught.value, "MULTI", None, None)
    else:  # refused when queued: EXECABORT, raised as the command's own error
        with pytest.raises(ResponseError) as caught:
            await pipe.execute()
        assert_no_secret(caught.value)
        assert_names(caught.value, "CLIENT", "ERR", d.key_node)
        assert caught.value.position == 2


# -- the replacement itself ------------------------------------------------------------------


async def test_a_retold_error_is_still_what_callers_catch(on_standalone: Deployment) -> None:
    with pytest.raises(ResponseError) as caught:
        await on_standalone.client.lpush(KEY, CANARY)
    err = caught.value
    assert type(err).__qualname__ == "ResponseError"  # error.type in traces and metrics
    assert isinstance(err, redis.exceptions.ResponseError | ResilientCacheError)
    assert err.status_code == "WRONGTYPE"
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), str(copy), copy.command, copy.redis_code) == (
        type(err),
        str(err),
        "LPUSH",
        "WRONGTYPE",
    )


@pytest.mark.parametrize(
    "annotated",
    [
        # redis-py 8.1's standalone pipeline and cluster pipeline: the args tuple's repr.
        f"Command # 2 (SET {KEY} {CANARY} EX x) of pipeline caused error: "
        "('value is not an integer or out of range',)",
        # Its cluster transaction: the message as it is.
        f"Command # 2 (SET {KEY} {CANARY} EX x) of pipeline caused error: "
        "value is not an integer or out of range",
    ],
)
def test_an_annotation_redis_py_still_makes_is_taken_apart(annotated: str) -> None:
    """If a redis-py release annotates errors some other way than the backend switches off,
    the annotation is still taken apart: position kept, command and arguments dropped."""
    command = batch_command(
        [(("GET", KEY), {}), (("SET", KEY, CANARY, "EX", "x"), {})], False, True
    )
    original = ResponseError(annotated, status_code="ERR")
    err = translate_batch_error(command, original, lambda command, position: "10.0.0.1:7000")
    assert isinstance(err, ResponseError)
    assert_no_secret(err)
    assert_names(err, "SET", "ERR", "10.0.0.1:7000")
    assert str(err) == (
        "ERR value is not an integer or out of range "
        "(SET, command #2 of the pipeline on 10.0.0.1:7000)"
    )
