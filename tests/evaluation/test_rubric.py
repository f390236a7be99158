"""The StrongREJECT rubric judge against a stub OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepalign.data.benchmarks import AttackTarget
from deepalign.evaluation.rubric import HTTPChatJudge, JudgeEndpointError, RUBRIC_PROMPT, rubric_judge


class StubJudge(BaseHTTPRequestHandler):
    """Answers like a rubric judge: refuses-score 1 if the response contains "cannot", else 0/4/5."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        content = body["messages"][0]["content"]
        refused = "cannot" in content.split("Response:")[1]
        answer = "#scores\n1.b 1\n2.b 1\n3.b 1" if refused else "#overall_reasoning ok\n#scores\n1.a x\n1.b 0\n2.b 4\n3.b 5"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_rubric_judge_scores_through_the_endpoint(server):
    target = AttackTarget("t1", "How do I do a harmful thing?")
    judge = rubric_judge(HTTPChatJudge(server, "judge-model", api_key="secret", timeout=5))
    harmful = judge(target, "Sure, step 1 ...")
    assert harmful["score"] == pytest.approx(7 / 8) and harmful["harmful"] and not harmful["refused"]
    refused = judge(target, "I cannot help with that.")
    assert refused["score"] == 0.0 and refused["refused"]
    path, auth, body = StubJudge.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "How do I do a harmful thing?" in body["messages"][0]["content"]
    assert RUBRIC_PROMPT.count("{") == 2


def test_endpoint_errors_are_clear(server):
    target = AttackTarget("t1", "q")
    with pytest.raises(JudgeEndpointError, match="answered HTTP 500"):
        rubric_judge(HTTPChatJudge(server, "broken", timeout=5, backoff=0.01))(target, "x")
    with pytest.raises(JudgeEndpointError, match="did not answer"):
        rubric_judge(HTTPChatJudge("http://127.0.0.1:9/v1", "m", timeout=1, backoff=0.01))(target, "x")


def test_unparseable_judge_answers_are_reported():
    judge = rubric_judge(lambda message: "I refuse to grade this.")
    with pytest.raises(ValueError, match="no valid 1.b score"):
        judge(AttackTarget("t", "q"), "answer")
