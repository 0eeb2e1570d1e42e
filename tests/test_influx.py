"""The same figures as InfluxDB line protocol: escaping per the spec, pushed to a real InfluxDB 1.x (Debian's
influxd on 127.0.0.1) and read back exactly, the 2.x write API's shape, and a failing push never stops a run."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from fedsecure.config import MetricsSettings
from fedsecure.errors import ConfigError
from fedsecure.observe.influx import InfluxPusher, line, round_lines

from .conftest import small_config


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_line_protocol_escaping_follows_the_spec():
    # https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/#special-characters
    assert line("cpu load", {"host name": "a,b=c"}, {"value": 1.5, "n": 3, "ok": True, "msg": 'say "hi" \\ bye'},
                1) == 'cpu\\ load,host\\ name=a\\,b\\=c value=1.5,n=3i,ok=true,msg="say \\"hi\\" \\\\ bye" 1'
    assert line("m", {}, {"f": 2.0}, 7) == "m f=2.0 7"
    assert line("m", {"empty": "", "t": "x"}, {"f": 1.0}, 7) == "m,t=x f=1.0 7"  # an empty tag value is dropped
    with pytest.raises(ValueError, match="at least one field"):
        line("m", {}, {"nan": float("nan")}, 1)  # NaN and inf are not representable: dropped, none left


def test_round_lines_carry_the_rounds_and_sites_figures():
    summary = {"round": 2, "seconds": 3.5, "bytes_down": 100, "bytes_up": 40, "eval_loss": 6.25, "sites_ok": 2}
    privacy = {"site 0": {"epsilon_spent": 1.5, "epsilon_budget": 3.0}, "site-1": {"epsilon_spent": None}}
    lines = round_lines("run/1", summary, privacy, 99)
    assert lines[0] == "fedsecure_round,run=run/1 round=2i,seconds=3.5,bytes_down=100i,bytes_up=40i,eval_loss=6.25," \
                       "sites_ok=2i 99"
    assert lines[1] == ("fedsecure_site,run=run/1,site=site\\ 0 epsilon_spent=1.5,epsilon_budget=3.0,"
                        "epsilon_remaining=1.5 99")
    assert len(lines) == 2  # a site with no figures yet has no line


def test_influx_settings_are_checked():
    with pytest.raises(ConfigError, match="metrics.influx_url"):
        small_config(metrics={"influx_url": "ftp://x"})
    with pytest.raises(ConfigError, match="metrics.influx_db"):
        small_config(metrics={"influx_url": "http://127.0.0.1:8086"})
    assert MetricsSettings(influx_url="http://h:8086", influx_db="d").influx_version == 1
    assert MetricsSettings(influx_url="http://h:8086", influx_org="o", influx_bucket="b").influx_version == 2


class _Capture(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict, bytes]] = []
    status = 204

    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Capture.seen.append((self.path, dict(self.headers), body))
        self.send_response(_Capture.status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_v2_write_api_shape_and_a_failing_push_is_counted_not_raised(monkeypatch):
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_INFLUX_TOKEN", "s3cret")
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        p = InfluxPusher(MetricsSettings(influx_url=url, influx_org="hosp a", influx_bucket="fl",
                                         influx_token_env="MY_INFLUX_TOKEN"))
        assert p.push(["m f=1.0 1"]) is True
        path, headers, body = _Capture.seen[-1]
        assert path == "/api/v2/write?org=hosp+a&bucket=fl&precision=ns"
        assert headers["Authorization"] == "Token s3cret" and body == b"m f=1.0 1\n"
        _Capture.status = 500
        assert p.push(["m f=1.0 2"]) is False and p.failures == 1
    finally:
        _Capture.status = 204
        srv.shutdown()
    assert p.push(["m f=1.0 3"]) is False and p.failures == 2  # server gone: counted, never raised


@pytest.mark.skipif(shutil.which("influxd") is None, reason="Debian's influxdb is not installed (.ci/run installs it)")
def test_a_real_influxdb_reads_back_exactly_what_was_pushed(tmp_path):
    http_port, bind_port = _port(), _port()
    conf = tmp_path / "influxdb.conf"
    conf.write_text(f'reporting-disabled = true\nbind-address = "127.0.0.1:{bind_port}"\n'
                    f'[meta]\n  dir = "{tmp_path}/meta"\n'
                    f'[data]\n  dir = "{tmp_path}/data"\n  wal-dir = "{tmp_path}/wal"\n'
                    f'[http]\n  bind-address = "127.0.0.1:{http_port}"\n  log-enabled = false\n'
                    '[monitor]\n  store-enabled = false\n')
    proc = subprocess.Popen(["influxd", "-config", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "influxd.log").open("wb"), start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "influxd.log").read_text()
                time.sleep(0.3)
        urllib.request.urlopen(urllib.request.Request(base + "/query", data=b"q=CREATE DATABASE fl", method="POST"),
                               timeout=10)
        privacy = {'site "A", north=1': {"epsilon_spent": 2.5, "epsilon_budget": 3.0},
                   "site\\b": {"epsilon_spent": 0.25, "epsilon_budget": 1.0}}
        summary = {"round": 3, "seconds": 4.25, "bytes_down": 1000, "bytes_up": 250, "eval_loss": 6.5, "sites_ok": 2}
        pusher = InfluxPusher(MetricsSettings(influx_url=base, influx_db="fl"))
        assert pusher.push(round_lines("run 1,x=y", summary, privacy, 1_700_000_000_000_000_000)) is True
        q = urllib.parse.urlencode({"db": "fl", "q": "SELECT * FROM fedsecure_site", "epoch": "ns"})
        res = json.loads(urllib.request.urlopen(f"{base}/query?{q}", timeout=10).read())["results"][0]["series"][0]
        rows = [dict(zip(res["columns"], v, strict=True)) for v in res["values"]]
        got = {r["site"]: (r["epsilon_spent"], r["epsilon_budget"], r["epsilon_remaining"], r["run"]) for r in rows}
        assert got == {'site "A", north=1': (2.5, 3.0, 0.5, "run 1,x=y"), "site\\b": (0.25, 1.0, 0.75, "run 1,x=y")}
        q = urllib.parse.urlencode({"db": "fl", "q": "SELECT * FROM fedsecure_round"})
        res = json.loads(urllib.request.urlopen(f"{base}/query?{q}", timeout=10).read())["results"][0]["series"][0]
        row = dict(zip(res["columns"], res["values"][0], strict=True))
        assert (row["round"], row["seconds"], row["bytes_up"], row["eval_loss"]) == (3, 4.25, 250, 6.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Slow(_Capture):
    delay_s = 1.5

    def do_POST(self):  # noqa: N802 - the http.server API
        time.sleep(_Slow.delay_s)
        super().do_POST()


def test_a_slow_influxdb_never_delays_a_round_and_gets_every_round_at_the_end():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Capture.seen.clear()
    try:
        p = InfluxPusher(MetricsSettings(influx_url=f"http://127.0.0.1:{srv.server_address[1]}", influx_db="fl"))
        t0 = time.monotonic()
        for i in range(3):
            p.submit([f"m f={i}.0 {i}"])
        assert time.monotonic() - t0 < 0.5  # three rounds queued at once, each push takes 1.5 s
        assert p.close(timeout_s=20) is True
        assert [b for _, _, b in _Capture.seen] == [b"m f=0.0 0\n", b"m f=1.0 1\n", b"m f=2.0 2\n"]
        assert (p.sent, p.failures, p.dropped) == (3, 0, 0)
    finally:
        srv.shutdown()


def test_a_full_queue_drops_the_oldest_round_and_close_is_bounded():
    # a server that takes 3 s per write: the queue cannot drain while six rounds arrive at once
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Slow.delay_s = 3.0
    try:
        p = InfluxPusher(MetricsSettings(influx_url=f"http://127.0.0.1:{port}", influx_db="fl"), queue_rounds=2)
        for i in range(6):
            p.submit([f"m f={i}.0 {i}"])
        assert p.dropped >= 3  # at most 2 wait (one more may be in flight)
        t0 = time.monotonic()
        assert p.close(timeout_s=1) is False
        assert time.monotonic() - t0 < 3
    finally:
        _Slow.delay_s = 1.5
        srv.shutdown()
