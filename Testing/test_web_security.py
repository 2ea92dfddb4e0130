"""The web app's rules on who may connect and which files it may touch (SegmentWithSAMWeb/security.py): the rules
alone, then real servers (``segmentwithsam web`` processes on 127.0.0.1, and one on every address with TLS)
asked by real HTTP and websocket clients: no key, a wrong key, another site's Origin, a foreign Host (DNS
rebinding), the right key from the page's own origin. And the command's message when the web extra is missing.
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SegmentWithSAMLib.errors import OutputError, VolumeError
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.io import write_volume
from SegmentWithSAMWeb.security import (
    KEY_ENV,
    DataFolder,
    OwnOrigin,
    ServeError,
    UploadedFile,
    Uploads,
    access_key,
    default_data_folder,
    is_loopback,
    page_url,
    tls_context,
)

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = "evil.example"


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                 ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                 ("::", False), ("example.org", False)])
def test_only_loopback_addresses_go_without_tls(host, loopback, tmp_path):
    assert is_loopback(host) is loopback
    if loopback:
        assert tls_context(host, None) is None
    else:
        with pytest.raises(ServeError, match="without TLS"):
            tls_context(host, None)
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ServeError, match="Cannot use the TLS certificate"):
        tls_context(host, str(tmp_path / "cert.pem"))
    with pytest.raises(ServeError, match="--keyfile needs --certfile"):
        tls_context(host, None, str(tmp_path / "cert.pem"))


def test_a_key_is_always_needed_given_or_made_new(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    key, made = access_key()
    assert made and len(key) >= 40 and key != access_key()[0]
    monkeypatch.setenv(KEY_ENV, "from-the-environment")
    assert access_key() == ("from-the-environment", False)
    (tmp_path / "key").write_text("from-a-file\n")
    assert access_key(key_file=str(tmp_path / "key")) == ("from-a-file", False)
    assert access_key("given", str(tmp_path / "key")) == ("given", False)
    (tmp_path / "empty").write_text("")
    for missing in ("empty", "missing"):
        with pytest.raises(ServeError, match="key file"):
            access_key(key_file=str(tmp_path / missing))
    assert page_url("127.0.0.1", 8080, "k") == "http://127.0.0.1:8080/?secret=k"
    assert page_url("::1", 8080, "k", tls=True) == "https://[::1]:8080/?secret=k"


def test_only_the_servers_own_host_and_origin_pass():
    on_loopback = OwnOrigin.serving("127.0.0.1", tls=False)
    local = ("127.0.0.1", 8080)
    for host in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"):
        assert on_loopback.refusal(host, None, local) is None, host
        assert on_loopback.refusal(host, f"http://{host}", local) is None, host
    assert on_loopback.refusal("[::1]:8080", "http://[::1]:8080", ("::1", 8080, 0, 0)) is None
    refused = {"no Host": (None, None), "another name": (f"{FOREIGN}:8080", None),
               "another port": ("127.0.0.1:8081", None), "no port": ("127.0.0.1", None),
               "another address": ("127.0.0.2:8080", None), "a bad port": ("127.0.0.1:80x", None),
               "a path": ("127.0.0.1:8080/x", None), "a user": ("me@127.0.0.1:8080", None),
               "another site": ("127.0.0.1:8080", f"http://{FOREIGN}"),
               "another site on this port": ("127.0.0.1:8080", f"http://{FOREIGN}:8080"),
               "another port's page": ("127.0.0.1:8080", "http://127.0.0.1:8081"),
               "https instead of http": ("127.0.0.1:8080", "https://127.0.0.1:8080"),
               "a sandboxed page": ("127.0.0.1:8080", "null"), "the machine's name": ("this-host:8080", None)}
    for what, (host, origin) in refused.items():
        assert on_loopback.refusal(host, origin, local), what
    on_network = OwnOrigin("https", frozenset({"this-host", "this-host.lan"}))
    arrived = ("::ffff:192.168.1.5", 443)  # an IPv4 client on a dual-stack socket
    for host in ("192.168.1.5", "192.168.1.5:443", "this-host", "this-host.lan:443"):
        assert on_network.refusal(host, f"https://{host}", arrived) is None, host
    assert on_network.refusal("localhost:443", None, arrived)  # "localhost" only on a loopback connection
    assert on_network.refusal("192.168.1.6:443", None, arrived)
    assert on_network.refusal("this-host", "http://this-host", arrived)
    assert on_network.refusal(f"{FOREIGN}:443", None, arrived)


def test_the_default_data_folder_is_private_and_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    folder = default_data_folder()
    assert folder == tmp_path / "share" / "segmentwithsam" / "web"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and DataFolder(folder).volumes() == []


def test_nothing_outside_the_data_folder_is_read_or_written(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"x")
    (data / "in.nii.gz").write_bytes(b"x")
    (data / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    (data / "linked").symlink_to(outside)
    folder = DataFolder(data)
    assert folder.resolve("in.nii.gz") == (data / "in.nii.gz").resolve()
    for name in ("../outside/secret.nii.gz", str(outside / "secret.nii.gz"), "link.nii.gz", "linked/secret.nii.gz",
                 "in.nii.gz/../../outside/secret.nii.gz"):
        with pytest.raises(VolumeError, match="outside the data folder"):
            folder.resolve(name)
    for name in ("", "..", "sub/out.nii.gz", "../out.nii.gz", "/tmp/out.nii.gz"):
        with pytest.raises((OutputError, VolumeError)):
            folder.output(name)
    assert folder.output("out.seg.nrrd") == data.resolve() / "out.seg.nrrd"
    with pytest.raises(VolumeError, match="does not exist"):
        DataFolder(tmp_path / "missing")


def test_the_data_folder_lists_volumes_and_dicom_folders_but_no_links(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.nrrd").write_bytes(b"x")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"x")
    (tmp_path / "out.seg.nrrd").write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(outside)  # a folder link leading out: neither listed nor walked
    assert DataFolder(tmp_path).volumes() == ["a.nii.gz", "out.seg.nrrd", "series/"]


def test_uploads_are_size_checked_read_by_the_core_and_never_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([0.5, 0.6, 2.0, 1.0]))
    write_volume(volume, tmp_path / "small.nrrd")
    content = (tmp_path / "small.nrrd").read_bytes()
    (tmp_path / "small.nrrd").unlink()
    uploads = Uploads(max_bytes=len(content))
    name, read = uploads.read([UploadedFile("C:\\Users\\me\\small.nrrd", content)])
    assert name == "small" and np.array_equal(read.array, volume.array)
    np.testing.assert_allclose(read.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    with pytest.raises(VolumeError, match="at most"):
        Uploads(max_bytes=len(content) - 1).read([UploadedFile("small.nrrd", content)])
    with pytest.raises(VolumeError, match="could not be read") as refused:
        uploads.read([UploadedFile("notes.nii.gz", b"not a volume")])
    assert "segmentwithsam-upload" not in str(refused.value) and "notes.nii.gz" in str(refused.value)
    with pytest.raises(VolumeError, match="upload one volume file"):
        uploads.read([UploadedFile("notes.txt", b"text")])
    with pytest.raises(VolumeError, match="repeated"):
        uploads.read([UploadedFile("1.dcm", b"x"), UploadedFile("sub/1.dcm", b"x")])
    flat = Volume(np.zeros((3, 3, 3), np.int16), np.eye(4))
    write_volume(flat, tmp_path / "flat.nrrd")
    with pytest.raises(VolumeError, match="constant"):
        Uploads(2**20).read([UploadedFile("flat.nrrd", (tmp_path / "flat.nrrd").read_bytes())])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.nrrd"]  # no upload folder is left behind


def test_the_command_says_how_to_get_the_web_extra_when_it_is_missing():
    shim = ("import sys; sys.modules['trame'] = None; sys.modules['trame_slicer'] = None; "
            "from SegmentWithSAMLib.cli import main; sys.exit(main(['web']))")
    done = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "SegmentWithSAM")})
    assert done.returncode == 2
    assert done.stderr.startswith("segmentwithsam: error:") and "pip install segmentwithsam[web]" in done.stderr


def test_the_core_never_imports_trame_and_imports_the_web_app_only_when_asked():
    for path in (ROOT / "SegmentWithSAM" / "SegmentWithSAMLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for top in (name.split(".")[0] for name in names):
                assert not top.startswith("trame"), f"{path.name} imports {top}"
                assert top != "SegmentWithSAMWeb" or node.col_offset > 0, f"{path.name} imports the web app at once"


# ---- real servers ------------------------------------------------------------------------------------------------

class WebProcess:
    """``segmentwithsam web ARGS`` in a child process (no key in its environment), its output read as it comes."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        self.process = subprocess.Popen([sys.executable, "-m", "SegmentWithSAMLib.cli", "web", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def started(self, timeout: float = 120) -> tuple[str, int, str]:
        """Once it serves: the URL it printed, its port and the key in the URL."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith("Files are opened") for line in self.lines):
            assert self.process.poll() is None, (self.lines, self.process.stderr.read())
            assert time.monotonic() < deadline, self.lines
            time.sleep(0.1)
        url = next(line.split(" at ", 1)[1].strip() for line in self.lines if " running at " in line)
        return url, int(url.split("/")[2].rsplit(":", 1)[1]), url.split("?secret=", 1)[1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _ask(url: str, *, origin: str | None = None, host: str | None = None, tls: ssl.SSLContext | None = None,
         secret: str | None = None, call: str | None = None) -> dict:
    """One client, as a browser or another program would be: an HTTP GET of ``url`` (http/https), or for a
    ws/wss ``url`` a websocket upgrade, then wslink's hello with ``secret`` (none: no secret sent) and, if the
    hello passed, the RPC ``call``. Returns what happened: {"status"} and, for a websocket, {"hello", "call"}
    (each wslink's result or error)."""
    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    headers = {"Host": host} if host else {}
    if origin:
        headers["Origin"] = origin

    async def rpc(ws, unchunker: UnChunker, rpc_id: str, method: str, args: list) -> dict:
        message = msgpack.packb({"wslink": "1.0", "id": rpc_id, "method": method, "args": args, "kwargs": {}})
        for chunk in generate_chunks(message, 0):
            await ws.send_bytes(chunk)
        while True:
            reply = await ws.receive(timeout=30)
            assert reply.type == aiohttp.WSMsgType.BINARY, reply
            answer = unchunker.process_chunk(reply.data)
            if answer is not None and answer.get("id") == rpc_id:
                return answer.get("result", answer.get("error"))

    async def run() -> dict:
        async with aiohttp.ClientSession() as session:
            if not url.startswith("ws"):
                async with session.get(url, headers=headers, ssl=tls or False, allow_redirects=False) as response:
                    return {"status": response.status, "text": await response.text()}
            try:
                ws = await session.ws_connect(url, headers=headers, ssl=tls or False)
            except aiohttp.WSServerHandshakeError as refused:
                return {"status": refused.status}
            async with ws:
                unchunker = UnChunker()
                unchunker.set_max_message_size(2**30)  # the server's answers (its limit of 512 B is for the client)
                hello = await rpc(ws, unchunker, "system:c0:0", "wslink.hello",
                                  [{"secret": secret}] if secret is not None else [{}])
                answer = {"status": 101, "hello": hello}
                if call:
                    answer["call"] = await rpc(ws, unchunker, "rpc:c0:1", call, [])
                return answer

    return asyncio.run(run())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A web app on 127.0.0.1 (a free port, no key given) with one volume file in its data folder."""
    pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")
    data = tmp_path_factory.mktemp("web-security-data")
    write_volume(Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4)), data / "patient.nii.gz")
    server = WebProcess("--port", "0", "--data", str(data))
    try:
        yield server, *server.started()
    finally:
        server.stop()


def test_the_new_key_is_printed_once_in_the_url(served):
    server, url, port, key = served
    assert url == f"http://127.0.0.1:{port}/?secret={key}" and len(key) >= 40
    assert sum(key in line for line in server.lines) == 1, server.lines


def test_the_websocket_is_refused_without_the_right_key(served):
    _, _, port, key = served
    ws = f"ws://127.0.0.1:{port}/ws"
    own = f"http://127.0.0.1:{port}"
    for secret in (None, "", "wslink-secret", key[:-1], key + "x"):  # wslink's default secret is no key either
        answer = _ask(ws, origin=own, secret=secret, call="trame.state.get")
        assert answer["hello"]["message"] == "Authentication failed", (secret, answer)
        assert answer["call"]["message"].startswith("Unauthorized"), (secret, answer)
    answer = _ask(ws, origin=own, secret=key, call="trame.state.get")
    assert answer["hello"]["clientID"], answer
    assert answer["call"]["state"]["data_files"] == ["patient.nii.gz"]  # the right key sees the data folder
    answer = _ask(ws, origin=f"http://localhost:{port}", secret=key)  # the same server under its loopback name
    assert answer["hello"]["clientID"], answer


def test_other_sites_pages_are_refused_over_http_and_websocket(served):
    _, _, port, key = served
    page, ws = f"http://127.0.0.1:{port}/index.html", f"ws://127.0.0.1:{port}/ws"
    assert _ask(page)["status"] == 200  # a browser's own GET of the page sends no Origin
    assert _ask(page, origin=f"http://127.0.0.1:{port}")["status"] == 200
    for origin in (f"http://{FOREIGN}", f"http://{FOREIGN}:{port}", f"http://127.0.0.1:{port + 1}", "null"):
        answer = _ask(page, origin=origin)
        assert answer["status"] == 403 and "may not use this server" in answer["text"], origin
        assert _ask(ws, origin=origin, secret=key) == {"status": 403}, origin  # refused before any hello


def test_a_foreign_host_header_is_refused_against_dns_rebinding(served):
    _, _, port, key = served
    for host in (f"{FOREIGN}:{port}", FOREIGN, f"127.0.0.1:{port + 1}", f"{FOREIGN}.:{port}"):
        answer = _ask(f"http://127.0.0.1:{port}/index.html", host=host)
        assert answer["status"] == 403 and "is not this server's address" in answer["text"], host
        # the rebound page's own websocket: its Origin and Host both name the foreign site
        assert _ask(f"ws://127.0.0.1:{port}/ws", host=host, origin=f"http://{host}", secret=key) == {"status": 403}
    assert _ask(f"http://127.0.0.1:{port}/index.html", host=f"localhost:{port}")["status"] == 200


def test_no_file_outside_the_pages_assets_is_served_over_http(served, tmp_path):
    _, _, port, _ = served
    for path in ("/patient.nii.gz", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/data/"):
        answer = _ask(f"http://127.0.0.1:{port}{path}")
        assert answer["status"] in (403, 404) and "root:" not in answer["text"], (path, answer["status"])


def test_another_address_without_tls_refuses_to_start(tmp_path):
    pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")
    done = subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "web", "--host", "0.0.0.0", "--port", "0",
                           "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Refusing to serve 0.0.0.0 without TLS" in done.stderr, done.stderr
    assert "running at" not in done.stdout


def test_another_address_is_served_over_tls_only(tmp_path):
    pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    certificate, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(private),
                    "-out", str(certificate)], check=True, capture_output=True, timeout=60)
    server = WebProcess("--host", "0.0.0.0", "--port", "0", "--data", str(tmp_path), "--certfile", str(certificate),
                        "--keyfile", str(private))
    try:
        url, port, key = server.started()
        assert url.startswith("https://") and url.endswith(f":{port}/?secret={key}")
        trust = ssl.create_default_context(cafile=str(certificate))
        assert _ask(f"https://127.0.0.1:{port}/index.html", origin=f"https://127.0.0.1:{port}", tls=trust)["status"] \
            == 200
        assert _ask(f"https://127.0.0.1:{port}/index.html", origin=f"http://127.0.0.1:{port}", tls=trust)["status"] \
            == 403  # a page over plain http is not this server's
        answer = _ask(f"wss://127.0.0.1:{port}/ws", origin=f"https://localhost:{port}", tls=trust, secret=key)
        assert answer["hello"]["clientID"], answer
        with pytest.raises(Exception, match="(?i)ssl|tls|wrong version|disconnect"):  # no plain http on this port
            _ask(f"http://127.0.0.1:{port}/index.html")
    finally:
        server.stop()
