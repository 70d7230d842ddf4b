"""The guard in front of every route, on a real server: the Host check against DNS rebinding,
and header bytes that are not ASCII."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx
import pytest
from test_serve import running_server

from lmforge.errors import LmforgeError
from lmforge.infer.scheduler import Scheduler
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.feedback import FeedbackStore

# What a page can read from a server without keys: the API, stored chats, their ratings.
READABLE = ["/v1/models", "/api/conversations", "/api/feedback", "/health", "/metrics", "/"]


def requests_counted(url: str, endpoint: str, status: int) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(rf'^lmforge_requests_total{{endpoint="{re.escape(endpoint)}",status="{status}"}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code


@pytest.fixture(scope="module")
def open_server(default_lm, tmp_path_factory):
    """No API keys: the server is protected by its loopback address alone."""
    store = FeedbackStore(tmp_path_factory.mktemp("guard") / "chat.db")
    with running_server(default_lm, store=store, max_batch=1) as (url, _):
        yield url
    store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:{port}", "localhost.:{port}",
                                  "[::1]", "[::1]:{port}", "[0:0:0:0:0:0:0:1]:{port}"])
def test_loopback_names_are_served(open_server, host):
    host = host.format(port=urlsplit(open_server).port)
    for path in READABLE:
        assert httpx.get(open_server + path, headers={"Host": host}).status_code == 200, path


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "localhost.attacker.example",
                                  "127.0.0.1.nip.io:{port}", "127.0.0.2", "[::2]:{port}", "localhost:http",
                                  "local host", "[::1", b"\xc3\xa9t\xc3\xa9.example", b"\xff\xfe"])
def test_other_names_are_refused(open_server, host):
    if isinstance(host, str):
        host = host.format(port=urlsplit(open_server).port)
    before = requests_counted(open_server, "/v1/models", 421)
    for path in READABLE:
        assert_error(httpx.get(open_server + path, headers={"Host": host}), 421, "host_not_allowed")
    r = httpx.post(open_server + "/v1/completions", headers={"Host": host}, json={"prompt": "Hi", "max_tokens": 1})
    assert_error(r, 421, "host_not_allowed")
    r = httpx.post(open_server + "/api/feedback", headers={"Host": host}, json={"message_id": 1, "rating": 1})
    assert_error(r, 421, "host_not_allowed")
    assert requests_counted(open_server, "/v1/models", 421) == before + 1  # refused, and still counted


def test_names_the_settings_allow(default_lm):
    settings = ServeSettings(host="192.168.7.7", allowed_hosts=["GPU-box.lan", "fd00::7", "chat.example.org:443"])
    with running_server(default_lm, settings, max_batch=1) as (url, _):
        for host in ["gpu-box.lan", "gpu-box.lan:8000", "gpu-box.lan.", "192.168.7.7:9000", "[fd00:0::7]:8000",
                     "chat.example.org", "localhost"]:
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ["other.lan", "box.lan", "192.168.7.8", "[fd00::8]", "example.org"]:
            assert_error(httpx.get(url + "/v1/models", headers={"Host": host}), 421, "host_not_allowed")
    with running_server(default_lm, ServeSettings(allowed_hosts=["*"]), max_batch=1) as (url, _):
        assert httpx.get(url + "/v1/models", headers={"Host": "anything.example"}).status_code == 200


def test_with_keys_the_key_protects_and_any_name_is_served(default_lm):
    """A rebinding page has no key; the host names a keyed server is reached by are not limited."""
    with running_server(default_lm, ServeSettings(api_keys=["k1"]), max_batch=1) as (url, _):
        good = {"Host": "gpu-box.lan:8000", "Authorization": "Bearer k1"}
        assert httpx.get(url + "/v1/models", headers=good).status_code == 200
        assert_error(httpx.get(url + "/v1/models", headers={"Host": "attacker.example"}), 401, "invalid_api_key")


def test_malformed_allowed_host_fails_at_start(default_lm):
    scheduler = Scheduler(default_lm.model, default_lm.tokenizer, max_batch=1, max_seq_len=64)  # never started
    for bad in ["two words", "host:port:more", "[::1", "exa$mple.org"]:
        with pytest.raises(LmforgeError, match="not a host name"):
            create_app(scheduler, default_lm.tokenizer, "m", ServeSettings(allowed_hosts=[bad]))
    with pytest.raises(LmforgeError, match="not a host name"):
        create_app(scheduler, default_lm.tokenizer, "m", ServeSettings(host="bad host"))


@pytest.fixture(scope="module")
def keyed_server(default_lm):
    """Keys with and without letters beyond ASCII; one server for every header below, so each
    case also shows that the bad headers before it left the server answering."""
    with running_server(default_lm, ServeSettings(api_keys=["k1", "clé"]), max_batch=1) as (url, _):
        yield url


@pytest.mark.parametrize("value", [b"Bearer \xc3\xa9", b"Bearer \xff\xfe\x80", b"\xff", b"Bearer k1\xa0",
                                   b"Bearer cl\xe9", b"Bearer \xf0\x9f\x94", b"bearer", b""])
def test_raw_bytes_in_the_key_are_a_401(keyed_server, value):
    url = keyed_server
    before = requests_counted(url, "/v1/models", 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": value}), 401, "invalid_api_key")
    assert requests_counted(url, "/v1/models", 401) == before + 1
    # A key with letters beyond ASCII works, sent as UTF-8 (as clients encode it).
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer clé".encode()}).status_code == 200
