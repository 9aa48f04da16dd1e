"""Browser-facing guards of `llmkit serve`: CORS only for the origins named with --cors-origin, and on a
loopback address only this machine's Host names answered (DNS-rebinding defence)."""
from __future__ import annotations

import httpx
import pytest

from llmkit.serve import create_app, served_hosts
from llmkit.serve.origin import host_name
from conftest import make_tiny_model, run_cli, server_process

pytestmark = pytest.mark.timeout(120)
APP = "http://app.example:5173"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    with server_process("--model", str(model_dir), "--cors-origin", APP, "--api-key", "k") as base:
        yield base


def test_loopback_server_answers_only_local_host_names(url):
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host
    # what a page on attacker.example sees after rebinding its name to 127.0.0.1
    for path in ("/health", "/", "/v1/models"):
        refused = httpx.get(url + path, headers={"Host": f"attacker.example:{port}",
                                                  "Authorization": "Bearer k"})
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "host_not_allowed" and "attacker.example" in error["message"]


def test_cors_only_for_the_named_origin(url):
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{url}/v1/chat/completions", headers=preflight)  # no API key: preflights carry none
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    listed = httpx.get(f"{url}/v1/models", headers={"Origin": APP, "Authorization": "Bearer k"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == APP
    card = listed.json()["data"][0]
    assert card["context_length"] == 256  # the tiny model's block size
    plain = httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in plain.headers  # the browser keeps the answer from that page


def test_without_cors_origin_no_cors_headers():
    """create_app as `serve` builds it on loopback without --cors-origin (in process: no second server)."""
    import numpy as np

    app = create_app(embedder=lambda texts: (np.zeros((len(texts), 2)), 1), embedding_model="e",
                     allowed_hosts=served_hosts("127.0.0.1"))
    from starlette.testclient import TestClient

    with TestClient(app, base_url="http://localhost:8000") as client:
        r = client.options("/v1/models", headers={"Origin": APP, "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
        assert client.get("/v1/models").json()["data"][0] == client.get("/v1/models/e").json()
        assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 403


def test_served_hosts_and_host_names():
    assert set(served_hosts("127.0.0.1")) >= {"127.0.0.1", "localhost", "::1"}
    assert "box.lan" in served_hosts("localhost", ["box.lan"])
    assert served_hosts("0.0.0.0") is None  # a public bind is reached by many names; --api-key guards it
    assert served_hosts("0.0.0.0", ["box.lan"]) == ["0.0.0.0", "box.lan"]
    assert [host_name(h) for h in (b"a.b:80", b"[::1]:8000", b"[::1]", b"LocalHost")] == ["a.b", "::1", "::1",
                                                                                          "localhost"]


@pytest.mark.parametrize("origin", ["app.example", "ftp://x.example", "http://x.example/path"])
def test_bad_cors_origin_is_one_line(monkeypatch, capsys, origin):
    code, out, err = run_cli(monkeypatch, capsys, "serve", "--model", "nowhere", "--cors-origin", origin)
    assert code != 0 and "--cors-origin" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
