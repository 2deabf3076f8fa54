"""The Runtime API endpoint with real runtimes: lambdaemu's Node.js bootstrap and a Python `provided`
bootstrap in their own process groups, driven by a real Loop; and, over raw sockets, what a runtime
that breaks the protocol gets (one protocol error, no exception out of the loop)."""

from __future__ import annotations

import json
import os
import socket
import stat
import textwrap
import time
from pathlib import Path

import pytest

from emulator.errors import UsageError
from emulator.loop import Loop
from emulator.runtime_api import RuntimeEndpoint, deadline_ms, error_summary, function_arn
from emulator.runtimes import LOAD_ERROR_TYPES, command, runtime_family
from runtime_harness import ROOT, Recorder, RuntimeEnv, run_until

PROVIDED_BOOTSTRAP = ROOT / "workloads" / "provided" / "bootstrap"


def write(path: Path, code: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


@pytest.fixture
def node_env(tmp_path: Path):
    """Start Node environments for handler files written into tmp_path; all closed at the end."""
    envs: list[RuntimeEnv] = []

    def start(spec: str, files: dict[str, str], env: dict[str, str] | None = None, **kwargs) -> RuntimeEnv:
        for name, code in files.items():
            write(tmp_path / name, code)
        runtime_env = RuntimeEnv(spec, task_root=tmp_path, env=env, log_path=tmp_path / f"env-{len(envs)}.log",
                                 **kwargs)
        envs.append(runtime_env)
        return runtime_env

    yield start
    for runtime_env in envs:
        runtime_env.close()


CONTEXT_HANDLER = """
    console.log('init ran');
    exports.handler = async (event, context) => ({
      event,
      requestId: context.awsRequestId,
      functionName: context.functionName,
      memory: context.memoryLimitInMB,
      arn: context.invokedFunctionArn,
      remainingMs: context.getRemainingTimeInMillis(),
      waits: context.callbackWaitsForEmptyEventLoop,
      clientContext: context.clientContext,
      trace: process.env._X_AMZN_TRACE_ID,
      handlerVar: process.env._HANDLER,
      taskRoot: process.env.LAMBDA_TASK_ROOT,
    });
"""


def test_init_ends_at_first_next_then_invocations_get_lambda_context(node_env, tmp_path):
    env = node_env("handlers/app.js:handler", {"handlers/app.js": CONTEXT_HANDLER})
    assert env.command.handler == "handlers/app.handler" and env.command.task_root == str(tmp_path)
    assert env.wait_next(), env.log()
    assert env.listener.events == [("next",)]  # init is over: exactly one GET /next, held
    assert env.endpoint.initialised and env.endpoint.next_pending

    first = env.result({"n": 1}, request_id="id-1", trace_id="Root=1-abc", function_timeout_s=5,
                       client_context='{"client": {"app": "x"}}')
    assert first["event"] == {"n": 1} and first["requestId"] == "id-1"
    assert first["functionName"] == "test-function" and first["memory"] == "256"
    assert first["arn"] == function_arn("test-function")
    assert 4000 < first["remainingMs"] <= 5000
    assert first["waits"] is True
    assert first["clientContext"] == {"client": {"app": "x"}} and first["trace"] == "Root=1-abc"
    assert first["handlerVar"] == "handlers/app.handler" and first["taskRoot"] == str(tmp_path)
    assert env.wait_next() and env.endpoint.next_pending

    second = env.result([1, 2])
    assert second["event"] == [1, 2] and "trace" not in second  # undefined: no trace header
    assert env.listener.kinds() == ["next", "response", "next", "response"]
    assert env.wait_next()
    log = env.log()
    assert "\tINFO\tinit ran" in log  # console lines as Lambda writes them: time, request id, level


def test_esm_module_and_lambda_style_handler(node_env):
    env = node_env("lib/app.handler", {"lib/app.mjs": """
        const started = Date.now();
        export const handler = async (event) => ({ esm: typeof require === 'undefined', event });
    """}, runtime="nodejs20.x")
    assert env.command.handler == "lib/app.handler"
    assert env.command.variables["AWS_EXECUTION_ENV"] == "AWS_Lambda_nodejs20.x"
    assert env.wait_next(), env.log()
    assert env.result("x") == {"esm": True, "event": "x"}


def test_handler_error_is_posted_with_its_type_and_the_environment_stays(node_env):
    env = node_env("app.js:handler", {"app.js": """
        class PaymentDeclined extends Error {}
        PaymentDeclined.prototype.name = 'PaymentDeclined';
        exports.handler = async (event) => {
          if (event.fail) throw new PaymentDeclined('card expired');
          return 'fine';
        };
    """})
    assert env.wait_next(), env.log()
    outcome = env.invoke({"fail": True})
    assert outcome[0] == "error" and outcome[2] == "PaymentDeclined"
    body = json.loads(outcome[3])
    assert error_summary(outcome[3]) == ("PaymentDeclined", "card expired")
    assert body["trace"][0] == "PaymentDeclined: card expired"
    assert env.wait_next() and env.proc.poll() is None  # still warm
    assert env.result({}) == "fine"


def test_init_error_is_posted_then_the_runtime_exits(node_env):
    env = node_env("app.js:handler", {"app.js": """
        throw new RangeError('bad config at module level');
    """})
    assert env.wait_next()
    assert env.proc.wait(timeout=10) == 129
    (kind, error_type, body), = env.listener.events
    assert kind == "init_error" and error_type == "RangeError"
    assert error_summary(body) == ("RangeError", "bad config at module level")
    assert error_type not in LOAD_ERROR_TYPES


def test_missing_function_is_a_load_error(node_env):
    env = node_env("app.js:nosuch", {"app.js": "exports.handler = async () => 1;\n"})
    assert env.wait_next()
    assert env.proc.wait(timeout=10) == 129
    (kind, error_type, body), = env.listener.events
    assert error_type == "Runtime.HandlerNotFound" and error_type in LOAD_ERROR_TYPES
    assert "app.nosuch is undefined or not exported" in error_summary(body)[1]


def test_crash_mid_invocation_ends_quietly(node_env):
    env = node_env("app.js:handler", {"app.js": """
        exports.handler = async (event) => { if (event.exit) process.exit(3); return 'ok'; };
    """})
    assert env.wait_next()
    assert env.invoke({"exit": True}) == ("exited", 3)
    assert env.run_until(lambda: not env.endpoint._clients, 5)
    assert not env.endpoint.next_pending and env.endpoint.failed is None
    assert env.listener.kinds() == ["next"]  # no response, no error, no protocol error: the exit tells


def test_uncaught_exception_fails_the_invocation_and_ends_the_process(node_env):
    env = node_env("app.js:handler", {"app.js": """
        exports.handler = (event, context, callback) => {
          setTimeout(() => { throw new TypeError('late failure'); }, 10);
        };
    """})
    assert env.wait_next()
    outcome = env.invoke({})
    assert outcome[0] == "error" and outcome[2] == "TypeError"
    assert env.proc.wait(timeout=10) == 129


def test_callback_waits_for_an_empty_event_loop_unless_told_not_to(node_env):
    # Lambda's Node runtime sends a callback handler's result once the event loop is empty; a pending
    # timer (as a pool's idle socket would) holds it back. An async handler's result goes at once.
    env = node_env("app.js:callback", {"app.js": """
        exports.callback = (event, context, callback) => {
          if (event.dontWait) context.callbackWaitsForEmptyEventLoop = false;
          setTimeout(() => {}, 1500);
          callback(null, 'done');
        };
    """})
    assert env.wait_next()
    t0 = time.monotonic()
    assert env.result({}) == "done"
    waited = time.monotonic() - t0
    assert env.wait_next()
    t0 = time.monotonic()
    assert env.result({"dontWait": True}) == "done"
    not_waited = time.monotonic() - t0
    assert waited >= 1.4 and not_waited < 1.0, (waited, not_waited)


def test_async_handler_does_not_wait_and_a_forgotten_callback_succeeds_with_null(node_env):
    env = node_env("app.js:asyncHandler", {"app.js": """
        exports.asyncHandler = async () => { setTimeout(() => {}, 1500); return 'done'; };
    """})
    assert env.wait_next()
    t0 = time.monotonic()
    assert env.result({}) == "done" and time.monotonic() - t0 < 1.0
    forgetful = node_env("app2.js:forgetful", {"app2.js": """
        exports.forgetful = (event, context, callback) => { setTimeout(() => {}, 300); };
    """})
    assert forgetful.wait_next()
    assert forgetful.result({}) is None  # the loop emptied without a callback: success with null


def test_sigstop_freezes_timers_while_next_is_held(node_env):
    env = node_env("app.js:handler", {"app.js": """
        let ticks = 0;
        setInterval(() => { ticks += 1; }, 10);
        exports.handler = async () => ticks;
    """})
    assert env.wait_next()
    base = env.result({})
    assert env.wait_next() and env.endpoint.next_pending

    env.freeze()
    time.sleep(1.5)  # 150 ticks if the process ran
    env.thaw()
    frozen_ticks = env.result({}) - base
    assert env.wait_next()

    # The same wait without a freeze, as the control.
    base = env.result({})
    assert env.wait_next()
    time.sleep(1.5)
    running_ticks = env.result({}) - base
    assert frozen_ticks < 20 and running_ticks > 100, (frozen_ticks, running_ticks)


def test_next_held_across_a_long_freeze_is_answered_on_thaw(node_env):
    env = node_env("app.js:handler", {"app.js": "exports.handler = async (e) => e;\n"})
    assert env.wait_next()
    env.freeze()
    env.run_until(lambda: False, 3.0)  # the loop keeps running; the held request just waits
    env.thaw()
    assert env.endpoint.next_pending
    assert env.result({"after": "freeze"}) == {"after": "freeze"}


def test_delivered_before_the_runtime_asks_is_answered_by_its_first_next(node_env):
    env = node_env("app.js:handler", {"app.js": "exports.handler = async (e) => e;\n"})
    env.endpoint.deliver("early", b'"cold start"', deadline_ms(3))
    assert env.endpoint.current_request == "early" and not env.endpoint.next_pending
    assert env.run_until(lambda: "response" in env.listener.kinds())
    assert env.listener.events[:2] == [("next",), ("response", "early", b'"cold start"')]


def test_python_provided_bootstrap(tmp_path):
    with RuntimeEnv(f"{PROVIDED_BOOTSTRAP}:echo", runtime="provided", task_root=tmp_path,
                    log_path=tmp_path / "env.log") as env:
        assert env.command.argv == (str(PROVIDED_BOOTSTRAP),) and env.command.handler == "echo"
        assert env.wait_next(), env.log()
        answer = env.result({"hello": "world"}, request_id="p-1", function_timeout_s=2)
        assert answer["handler"] == "echo" and answer["event"] == {"hello": "world"}
        assert answer["requestId"] == "p-1" and 1000 < answer["remainingMs"] <= 2000
        assert env.wait_next()
        outcome = env.invoke({"fail": "nope"})
        assert outcome[0] == "error" and outcome[2] == "EchoError"
        assert error_summary(outcome[3]) == ("EchoError", "nope")
        assert env.wait_next()
        # A connection per request (as curl-based bootstraps do): still one environment, no protocol error.
        assert env.result({"n": 3})["event"] == {"n": 3}
        assert env.wait_next()
        assert env.invoke({"exit": 7}) == ("exited", 7)
        assert "protocol_error" not in env.listener.kinds()

    with RuntimeEnv(f"{PROVIDED_BOOTSTRAP}:fail-init", runtime="provided", task_root=tmp_path) as env:
        assert env.wait_next()
        assert env.proc.wait(timeout=10) == 1
        assert env.listener.events[0][:2] == ("init_error", "Runtime.InitError")


# --- a runtime that breaks the protocol (raw sockets) ------------------------------------------------


class RawRuntime:
    """An endpoint on its own loop and blocking client sockets, for sending exactly the bytes a test wants."""

    def __init__(self, max_body: int = 1024) -> None:
        self.loop = Loop()
        self.listener = Recorder()
        self.endpoint = RuntimeEndpoint(self.loop, self.listener, function_arn="arn:test", max_body=max_body)
        host, port = self.endpoint.listen().split(":")
        self.addr = (host, int(port))

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=5)
        self.pump(0.05)
        return sock

    def pump(self, seconds: float = 0.2) -> None:
        run_until(self.loop, lambda: False, seconds)

    def exchange(self, sock: socket.socket, data: bytes, seconds: float = 0.3) -> bytes:
        """Send `data`, run the loop, and return what came back (b"" if the endpoint closed without a word)."""
        sock.sendall(data)
        self.pump(seconds)
        sock.settimeout(0.5)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not self.endpoint.failed:
                    break  # a kept-alive connection: one answer is all there is
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)

    def invocation_in_progress(self, request_id: str) -> socket.socket:
        """A connection whose GET /next got invocation `request_id` (delivered and read)."""
        sock = self.connect()
        self.exchange(sock, get_next(), 0.1)
        self.endpoint.deliver(request_id, b"{}", deadline_ms(1))
        self.pump(0.1)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        return sock

    def close(self) -> None:
        self.endpoint.close()
        self.loop.close()


@pytest.fixture
def raw():
    runtime = RawRuntime()
    yield runtime
    runtime.close()


def get_next() -> bytes:
    return b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n"


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST /2018-06-01/runtime/{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body


def assert_one_protocol_error(runtime: RawRuntime, fragment: str) -> None:
    errors = [e for e in runtime.listener.events if e[0] == "protocol_error"]
    assert len(errors) == 1 and fragment in errors[0][1], runtime.listener.events
    assert runtime.endpoint.failed == errors[0][1]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(runtime.addr, timeout=2).close()  # it stopped listening
    with pytest.raises(RuntimeError):
        runtime.endpoint.deliver("late", b"{}", deadline_ms(1))


def test_full_exchange_on_one_kept_alive_connection_and_404_is_not_fatal(raw):
    sock = raw.connect()
    answer = raw.exchange(sock, b"GET /2018-06-01/runtime/nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert raw.exchange(sock, b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n",
                        0.1) == b""  # held: nothing comes back yet
    assert raw.listener.events == [("next",)] and raw.endpoint.next_pending
    raw.endpoint.deliver("abc/1", b'{"k": 1}', 1234567890123, "Root=1", cognito_identity='{"id": 1}')
    raw.pump(0.1)
    sock.settimeout(2)
    head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"k": 1}'
    for header in (b"lambda-runtime-aws-request-id: abc/1", b"lambda-runtime-deadline-ms: 1234567890123",
                   b"lambda-runtime-invoked-function-arn: arn:test", b"lambda-runtime-trace-id: Root=1",
                   b'lambda-runtime-cognito-identity: {"id": 1}', b"content-type: application/json"):
        assert header.lower() in head.lower()
    assert b"client-context" not in head.lower()
    answer = raw.exchange(sock, post("invocation/abc%2F1/response", b'"ok"'))
    assert answer.startswith(b"HTTP/1.1 202 ") and answer.endswith(b'{"status": "OK"}')
    assert raw.listener.events[-1] == ("response", "abc/1", b'"ok"')
    assert raw.exchange(sock, get_next(), 0.1) == b""
    assert raw.endpoint.next_pending and raw.endpoint.failed is None


def test_error_post_and_a_second_connection(raw):
    raw.invocation_in_progress("r1")
    other = raw.connect()  # a bootstrap may answer on another connection
    big = json.dumps({"errorType": "X", "errorMessage": "m" * 2000}).encode()[:1000]
    answer = raw.exchange(other, post("invocation/r1/error", big,
                                      f"{'Lambda-Runtime-Function-Error-Type'}: Function.Custom\r\nExpect: 100-continue\r\n"))
    assert answer.startswith(b"HTTP/1.1 100 ") or answer.startswith(b"HTTP/1.1 202 ")
    raw.pump(0.1)
    assert raw.listener.events[-1] == ("error", "r1", "Function.Custom", big)
    assert raw.endpoint.current_request is None


def test_junk_bytes_are_one_protocol_error(raw):
    sock = raw.connect()
    answer = raw.exchange(sock, b"\x00\x01 this is not HTTP \r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert_one_protocol_error(raw, "malformed HTTP request")
    raw.pump(0.1)  # the loop goes on without exceptions


def test_oversized_body_is_a_protocol_error_before_it_is_read(raw):
    sock = raw.invocation_in_progress("r1")
    head = (b"POST /2018-06-01/runtime/invocation/r1/response HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    answer = raw.exchange(sock, head + b"x" * 5000)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert_one_protocol_error(raw, "request body over 1024 bytes")
    assert [e[0] for e in raw.listener.events] == ["next", "protocol_error"]  # no response recorded


def test_oversized_chunked_body_is_a_protocol_error(raw):
    sock = raw.connect()
    chunk = b"400\r\n" + b"y" * 0x400 + b"\r\n"
    answer = raw.exchange(sock, b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert_one_protocol_error(raw, "request body over")


def test_oversized_headers_are_a_protocol_error(raw):
    sock = raw.connect()
    raw.exchange(sock, b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nX-Pad: " + b"p" * 40000)
    assert_one_protocol_error(raw, "malformed HTTP request")


def test_unknown_request_id_is_a_protocol_error(raw):
    sock = raw.invocation_in_progress("right")
    answer = raw.exchange(sock, post("invocation/wrong/response", b"{}"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"InvalidRequestID" in answer
    assert_one_protocol_error(raw, "unknown request id 'wrong'")


def test_state_violations_are_protocol_errors():
    cases = [
        # a second GET /next while one is held
        (lambda rt, a, b: (rt.exchange(a, get_next(), 0.1), rt.exchange(b, get_next())), "a second GET /next"),
        # an init error after init has ended
        (lambda rt, a, b: (rt.exchange(a, get_next(), 0.1), rt.exchange(b, post("init/error", b"{}"))),
         "init error posted after init"),
        # a response when nothing was delivered
        (lambda rt, a, b: rt.exchange(a, post("invocation/x/response", b"{}")), "no invocation in progress"),
    ]
    for action, fragment in cases:
        runtime = RawRuntime()
        try:
            a, b = runtime.connect(), runtime.connect()
            action(runtime, a, b)
            assert_one_protocol_error(runtime, fragment)
        finally:
            runtime.close()


def test_too_many_connections_is_a_protocol_error(raw):
    socks = [socket.create_connection(raw.addr, timeout=5) for _ in range(17)]
    raw.pump(0.2)
    assert_one_protocol_error(raw, "more than 16 connections")
    for sock in socks:
        sock.close()


def test_peer_closing_mid_request_is_not_a_protocol_error(raw):
    sock = raw.connect()
    sock.sendall(b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc")
    sock.close()
    raw.pump(0.2)
    assert raw.listener.events == [] and raw.endpoint.failed is None and not raw.endpoint._clients


def test_error_summary_tolerates_anything():
    assert error_summary(b'{"errorType": "T", "errorMessage": "m", "trace": []}') == ("T", "m")
    assert error_summary(b"not json at all") == ("", "not json at all")
    assert error_summary(b'["a"]') == ("", '["a"]')
    assert error_summary(b'{"errorType": 5, "errorMessage": "m"}') == ("", "m")
    assert error_summary(b"\xff\xfe") == ("", "\ufffd\ufffd")


# --- building the command ----------------------------------------------------------------------------


def test_command_validates_without_running_the_handler(tmp_path, monkeypatch):
    write(tmp_path / "app.js", "exports.handler = async () => 1;\n")
    write(tmp_path / "side.mjs", "throw new Error('must not run');\nexport const handler = 1;\n")
    cmd = command("side.mjs:handler", task_root=str(tmp_path))  # parsed, not run
    assert cmd.runtime == "nodejs" and cmd.handler == "side.handler" and cmd.cwd == str(tmp_path)
    env = cmd.environ({"PATH": "/bin", "_HANDLER": "user"}, "127.0.0.1:9", {"AWS_LAMBDA_FUNCTION_NAME": "x"})
    assert env["_HANDLER"] == "side.handler" and env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "lambdaemu-function" and env["PATH"] == "/bin"

    assert runtime_family("app.js:handler") == "nodejs" and runtime_family("x.py:handler") == "python"
    assert runtime_family("workloads.sqlalchemy_pool:handler") == "python"

    def refused(spec: str, fragment: str, runtime: str | None = None) -> None:
        with pytest.raises(UsageError) as info:
            command(spec, runtime, str(tmp_path))
        message = str(info.value)
        assert fragment in message, message
        assert "--handler" in message or "--runtime" in message or "node" in message

    refused("missing.js:handler", "file 'missing.js' not found")
    refused("app.js:", "names no function")
    refused("nothing.handler", "no nothing.js, .mjs or .cjs", runtime="nodejs")
    refused("../app.handler", "is neither", runtime="nodejs")
    refused("app.js:handler", "not a runtime lambdaemu knows", runtime="java21")
    write(tmp_path / "broken.js", "exports.handler = async () => {;\n")
    refused("broken.js:handler", "SyntaxError")
    write(tmp_path / "app.mjs", "export const handler = 1;\n")
    refused("app.mjs:handler", "Lambda would load app.js")
    write(tmp_path / "my.app.js", "exports.handler = 1;\n")
    refused("my.app.js:handler", "dot")
    write(tmp_path / "pkg" / "package.json", '{"dependencies": {"left-pad": "1.3.0"}}')
    write(tmp_path / "pkg" / "fn.js", "exports.handler = async () => 1;\n")
    refused("pkg/fn.js:handler", "run npm ci --prefix")
    write(tmp_path / "notexec", "#!/bin/sh\n")
    refused("notexec", "not an executable file", runtime="provided")

    # A directory with an executable bootstrap; the handler string is optional.
    boot = write(tmp_path / "custom" / "bootstrap", "#!/bin/sh\n")
    boot.chmod(boot.stat().st_mode | stat.S_IXUSR)
    cmd = command("custom", "provided.al2023", str(tmp_path))
    assert cmd.argv == (str(boot),) and cmd.handler == "" and cmd.task_root == str(boot.parent)

    # No node on PATH, then a node that is too old: one line naming what to install.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    refused("app.js:handler", "need node >= 18 on PATH")
    old = write(tmp_path / "oldnode" / "node", "#!/bin/sh\necho v16.20.0\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", str(old.parent))
    refused("app.js:handler", "v16.20.0")


def test_python_handlers_are_not_runtime_api_commands():
    with pytest.raises(ValueError):
        command("workloads.sqlalchemy_pool:handler")


def test_node_bootstrap_ships_with_the_package():
    from emulator.runtimes import NODE_BOOTSTRAP

    assert NODE_BOOTSTRAP.is_file() and os.access(PROVIDED_BOOTSTRAP, os.X_OK)


def test_mangled_requests_never_raise_out_of_the_loop():
    # Valid requests cut, corrupted and spliced at random points: whatever arrives, the loop callbacks
    # return normally and the endpoint reports at most one protocol error.
    import random

    rng = random.Random(20261122)
    valid = [get_next(), post("invocation/r1/response", b'{"ok": true}'), post("init/error", b"{}"),
             post("invocation/r1/error", b"{}", "Lambda-Runtime-Function-Error-Type: E\r\n"),
             b"POST /2018-06-01/runtime/invocation/r1/response HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n0\r\n\r\n"]
    for _ in range(100):
        data = bytearray(b"".join(rng.choice(valid) for _ in range(rng.randint(1, 3))))
        for _ in range(rng.randint(0, 4)):
            action, at = rng.random(), rng.randrange(len(data) + 1)
            if action < 0.4:
                data[at:at + 1] = bytes([rng.randrange(256)])
            elif action < 0.7:
                data[at:at] = rng.choice([b"\r\n", b"\x00", b":", b" ", b"\r\n\r\n", b"9" * 12])
            else:
                del data[at:]
        runtime = RawRuntime()
        try:
            sock = runtime.connect()
            try:
                sock.sendall(bytes(data))
                if rng.random() < 0.5:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            runtime.pump(0.05)
            if runtime.endpoint.next_pending:
                runtime.endpoint.deliver("r1", b"{}", deadline_ms(1))
                runtime.pump(0.05)
            assert runtime.listener.kinds().count("protocol_error") <= 1
            sock.close()
            runtime.pump(0.02)
        finally:
            runtime.close()


def test_deliver_refuses_values_that_are_not_header_values(raw):
    for bad in ({"request_id": "a\r\nX-Injected: 1"}, {"request_id": ""}, {"trace_id": "t\n"}):
        args = {"request_id": "ok", **bad}
        with pytest.raises(ValueError):
            raw.endpoint.deliver(args.pop("request_id"), b"{}", deadline_ms(1), **args)
    assert raw.endpoint.current_request is None
