"""HTTPChatJudge on httpx against real local HTTP servers (127.0.0.1): retries and backoff,
Retry-After, the total deadline (also against servers that drip), redirects that must not carry the
API key, https for non-loopback hosts, and the key kept out of repr and error messages."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepalign.errors import EndpointError, InputError
from deepalign.evaluation.rubric import HTTPChatJudge, JudgeEndpointError

KEY = "sk-test-0123456789-secret"


class Handler(BaseHTTPRequestHandler):
    """Records each request, then plays the server's script: step n answers request n (the last
    step repeats)."""

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        server = self.server
        server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                "body": json.loads(raw) if raw else None, "time": time.monotonic()})
        server.script[min(len(server.requests), len(server.script)) - 1](self)

    def log_message(self, *args):
        pass


def reply(status: int = 200, body: bytes = b"", headers: dict | None = None):
    def step(handler):
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return step


def answer(content: str = "the answer"):
    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def drip_body(handler):
    """A 200 whose 60-byte body comes one byte every 0.2 s (12 s in all)."""
    handler.send_response(200)
    handler.send_header("Content-Length", "60")
    handler.end_headers()
    _drip(handler, b"x" * 60)


def drip_headers(handler):
    """A status line, then headers one byte every 0.2 s."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    _drip(handler, b"X-Slow: " + b"a" * 60 + b"\r\n\r\n")


def _drip(handler, data: bytes):
    try:
        for i in range(len(data)):
            handler.wfile.write(data[i:i + 1])
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:  # the client hung up
        pass


@pytest.fixture
def serve():
    """``serve(*steps) -> (server, base_url)``; ``server.requests`` lists what it received."""
    servers = []

    def start(*script):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.script, httpd.requests = list(script), []
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(httpd)
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def judge(url: str, **kwargs) -> HTTPChatJudge:
    return HTTPChatJudge(url, "judge-model", **{"api_key": KEY, "timeout": 5.0, "backoff": 0.01, **kwargs})


def test_an_answer_with_the_request_openai_expects(serve):
    server, url = serve(answer("graded"))
    assert judge(url + "/", max_tokens=64)("grade this") == "graded"
    assert judge(url)("grade this", system="You are a strict grader.") == "graded"
    first, second = server.requests
    assert first["path"] == "/v1/chat/completions" and first["authorization"] == f"Bearer {KEY}"
    assert first["body"] == {"model": "judge-model", "messages": [{"role": "user", "content": "grade this"}],
                             "temperature": 0.0, "max_tokens": 64}
    assert second["body"]["messages"] == [{"role": "system", "content": "You are a strict grader."},
                                          {"role": "user", "content": "grade this"}]


def test_503_then_200_is_retried(serve):
    server, url = serve(reply(503, b"warming up"), answer("after a retry"))
    assert judge(url)("q") == "after a retry"
    assert len(server.requests) == 2


def test_429_waits_for_retry_after(serve):
    server, url = serve(reply(429, b"slow down", {"Retry-After": "1"}), answer("ok"))
    assert judge(url)("q") == "ok"
    first, second = server.requests
    assert second["time"] - first["time"] >= 0.9  # the server's 1 s, not the 0.01 s backoff


def test_a_retry_after_past_the_deadline_fails_at_once(serve):
    server, url = serve(reply(429, b"", {"Retry-After": "30"}), answer())
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"answered HTTP 429.*would pass the timeout of 2\.0 s"):
        judge(url, timeout=2.0)("q")
    assert time.monotonic() - started < 1.0 and len(server.requests) == 1


def test_persistent_500_fails_after_max_attempts(serve):
    server, url = serve(reply(500, b"boom " + b"x" * 1000))
    with pytest.raises(JudgeEndpointError, match=r"answered HTTP 500: 'boom x+' \(after 3 attempts") as caught:
        judge(url, max_attempts=3)("q")
    message = str(caught.value)
    assert len(server.requests) == 3 and "x" * 201 not in message and "\n" not in message
    assert url + "/chat/completions" in message


def test_client_errors_are_not_retried(serve):
    server, url = serve(reply(401, b"bad key"), answer())
    with pytest.raises(EndpointError, match=r"answered HTTP 401: 'bad key'"):
        judge(url)("q")
    assert len(server.requests) == 1


def test_a_redirect_to_another_host_is_refused_and_gets_no_key(serve):
    target, target_url = serve(answer("stolen"))
    _, url = serve(reply(302, b"", {"Location": target_url + "/chat/completions"}))
    with pytest.raises(EndpointError, match=rf"HTTP 302, a redirect to '{target_url}/chat/completions'") as caught:
        judge(url)("q")
    assert target.requests == []  # nothing reached the other port, so no Authorization header either
    assert KEY not in str(caught.value)


@pytest.mark.parametrize("script", [drip_body, drip_headers], ids=["body", "headers"])
def test_a_dripping_server_cannot_hold_the_call_past_the_deadline(serve, script):
    _, url = serve(script)
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"did not answer within the timeout of 1\.0 s"):
        judge(url, timeout=1.0)("q")
    assert time.monotonic() - started < 2.0
    workers = [t for t in threading.enumerate() if t.name == "deepalign-judge-http"]
    for worker in workers:  # the socket was shut down: the worker does not wait for the drip to end
        worker.join(timeout=1.0)
    assert not any(worker.is_alive() for worker in workers)


def test_an_unreachable_endpoint_is_retried_then_reported():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EndpointError, match=r"did not answer \(ConnectError.*after 3 attempts"):
        judge(f"http://127.0.0.1:{port}/v1", max_attempts=3)("q")


def test_the_key_is_in_no_repr_and_no_error_message(serve):
    def echo_auth(handler):  # a server that quotes the request's Authorization header back
        reply(500, f"you sent {handler.headers.get('Authorization')}".encode())(handler)

    _, url = serve(echo_auth)
    client = judge(url, max_attempts=2)
    assert KEY not in repr(client) and KEY not in str(client) and "judge-model" in repr(client)
    with pytest.raises(EndpointError) as caught:
        client("q")
    assert KEY not in str(caught.value) and "you sent Bearer ***" in str(caught.value)


def test_plain_http_only_to_loopback_unless_allowed():
    with pytest.raises(InputError, match=r"base_url 'http://example.com/v1' is plain http"):
        HTTPChatJudge("http://example.com/v1", "m")
    assert HTTPChatJudge("http://example.com/v1", "m", allow_insecure_http=True).base_url == "http://example.com/v1"
    for url in ("https://example.com/v1", "http://localhost:8000/v1", "http://127.3.2.1/v1", "http://[::1]:8000/v1"):
        HTTPChatJudge(url, "m")
    with pytest.raises(InputError, match="http\\(s\\) URL with a host, got 'ftp://example.com'"):
        HTTPChatJudge("ftp://example.com", "m")
    with pytest.raises(InputError, match="timeout must be a positive number of seconds, got 0"):
        HTTPChatJudge("https://example.com/v1", "m", timeout=0)
    with pytest.raises(InputError, match="max_attempts must be a positive int, got 0"):
        HTTPChatJudge("https://example.com/v1", "m", max_attempts=0)


@pytest.mark.parametrize("body, problem", [
    (b"<html>oops</html>", "returned something that is not JSON: '<html>oops</html>'"),
    (b'{"error": {"message": "no such model"}}', r"returned no choices\[0\].message.content"),
    (b'{"choices": [{"message": {"content": null}}]}', r"returned no choices\[0\].message.content"),
])
def test_answers_that_are_not_chat_completions(serve, body, problem):
    server, url = serve(reply(200, body))
    with pytest.raises(EndpointError, match=problem):
        judge(url)("q")
    assert len(server.requests) == 1
