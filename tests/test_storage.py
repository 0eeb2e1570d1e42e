"""Sealed storage: round trips, every kind of tampering, keys, rotation, crashes, and no plaintext at rest."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedsecure.crypto import (
    generate_keyring,
    inspect,
    open_bytes,
    open_tensors,
    open_to_file,
    read_keyring_file,
    rewrap,
    seal_bytes,
    seal_tensors,
    write_keyring_file,
)
from fedsecure.crypto.keys import KeyRing, keyring_from_command, keyring_from_env, keyring_from_passphrase
from fedsecure.crypto.rotation import rotate
from fedsecure.crypto.sealed import TAG
from fedsecure.errors import FedSecureError, IntegrityError, KeyMaterialError

from .conftest import global_adapter, small_config

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16


@pytest.fixture
def ring() -> KeyRing:
    return generate_keyring()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 5 * CHUNK + 7])
def test_round_trip_around_chunk_boundaries(tmp_path, ring, size):
    data = os.urandom(size)
    p = seal_bytes(tmp_path / "f.sealed", data, ring, {"k": "v"}, chunk_size=CHUNK)
    out, meta = open_bytes(p, ring)
    assert bytes(out) == data and meta == {"k": "v"}
    assert inspect(p).plaintext_size == size
    assert os.stat(p).st_mode & 0o777 == 0o600


def _sealed(tmp_path, ring, name="f.sealed", n=3 * CHUNK + 5) -> tuple[Path, bytes]:
    data = os.urandom(n)
    return seal_bytes(tmp_path / name, data, ring, {"round": "1"}, chunk_size=CHUNK), data


def _expect_failure(path: Path, ring: KeyRing) -> None:
    with pytest.raises((IntegrityError, KeyMaterialError)) as e:
        open_bytes(path, ring)
    assert str(path) in str(e.value) or "key" in str(e.value)


def test_a_flipped_bit_anywhere_fails(tmp_path, ring):
    p, _ = _sealed(tmp_path, ring)
    original = p.read_bytes()
    for i in range(len(original)):  # header, key slot, wrapped key, every chunk and tag
        damaged = bytearray(original)
        damaged[i] ^= 1 << (i % 8)
        p.write_bytes(bytes(damaged))
        _expect_failure(p, ring)


def test_truncation_at_every_length_fails(tmp_path, ring):
    p, _ = _sealed(tmp_path, ring)
    original = p.read_bytes()
    for n in range(len(original)):
        p.write_bytes(original[:n])
        _expect_failure(p, ring)
        # the streaming opener has its own chunk loop: it must refuse the same files, writing nothing
        with pytest.raises((IntegrityError, KeyMaterialError)):
            open_to_file(p, tmp_path / "out.bin", ring)
        assert not (tmp_path / "out.bin").exists()
    p.write_bytes(original + b"\0" * (CHUNK + TAG))  # an appended chunk fails too
    _expect_failure(p, ring)


def test_swapped_chunks_and_foreign_chunks_fail(tmp_path, ring):
    p, _ = _sealed(tmp_path, ring)
    q, _ = _sealed(tmp_path, ring, "g.sealed")
    off, full = inspect(p).data_offset, CHUNK + TAG
    raw = bytearray(p.read_bytes())
    a, b = raw[off: off + full], raw[off + full: off + 2 * full]
    swapped = raw[:off] + b + a + raw[off + 2 * full:]
    p.write_bytes(bytes(swapped))
    _expect_failure(p, ring)
    raw_q = q.read_bytes()
    off_q = inspect(q).data_offset
    mixed = raw[:off] + raw_q[off_q: off_q + full] + raw[off + full:]  # chunk 0 of another file
    p.write_bytes(bytes(mixed))
    _expect_failure(p, ring)


def test_header_slot_from_another_file_fails(tmp_path, ring):
    p, _ = _sealed(tmp_path, ring)
    q, _ = _sealed(tmp_path, ring, "g.sealed")
    ip, iq = inspect(p), inspect(q)
    graft = q.read_bytes()[: iq.data_offset] + p.read_bytes()[ip.data_offset:]
    p.write_bytes(graft)
    _expect_failure(p, ring)


def test_wrong_key_and_rotated_away_key(tmp_path, ring):
    p, data = _sealed(tmp_path, ring)
    other = generate_keyring()
    with pytest.raises(KeyMaterialError, match="no key with id"):
        open_bytes(p, other)
    impostor = KeyRing(current=ring.current, keys={ring.current: os.urandom(32)})  # same id, other bytes
    with pytest.raises(IntegrityError, match="failed authentication"):
        open_bytes(p, impostor)
    kfile = write_keyring_file(tmp_path / "k.json", ring)
    result = rotate(kfile, [tmp_path], retire=True)
    assert result.rewrapped == 1 and result.retired == [ring.current]
    with pytest.raises(KeyMaterialError):
        open_bytes(p, ring)  # the old key alone no longer opens it
    assert bytes(open_bytes(p, read_keyring_file(kfile))[0]) == data


def test_nothing_is_returned_or_written_from_a_failed_file(tmp_path, ring):
    p, _ = _sealed(tmp_path, ring)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        open_to_file(p, tmp_path / "out.bin", ring)
    assert not (tmp_path / "out.bin").exists() and not list(tmp_path.glob(".out.bin*"))


def test_key_file_with_loose_permissions_is_refused(tmp_path, ring):
    k = write_keyring_file(tmp_path / "k.json", ring)
    assert k.stat().st_mode & 0o777 == 0o600
    os.chmod(k, 0o640)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        read_keyring_file(k)
    with pytest.raises(KeyMaterialError, match="refusing to overwrite"):
        write_keyring_file(k, ring)


def test_malformed_keyring_is_a_clear_error(tmp_path):
    k = tmp_path / "k.json"
    fd = os.open(k, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"current": "a", "keys": {"a": "not base64!"}}')
    os.close(fd)
    with pytest.raises(KeyMaterialError, match="is not a keyring"):
        read_keyring_file(k)


def test_env_passphrase_and_command_providers(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv("FEDSECURE_KEK", base64.b64encode(key).decode())
    monkeypatch.setenv("FEDSECURE_KEK_ID", "hsm-7")
    assert keyring_from_env().keys == {"hsm-7": key}
    monkeypatch.setenv("FEDSECURE_PASSPHRASE", "correct horse battery staple")
    a, b = keyring_from_passphrase(tmp_path / "salt"), keyring_from_passphrase(tmp_path / "salt")
    assert a.keys == b.keys and len(a.keys[a.current]) == 32  # same passphrase + salt, same key
    monkeypatch.setenv("FEDSECURE_PASSPHRASE", "short")
    with pytest.raises(KeyMaterialError, match="shorter than 12"):
        keyring_from_passphrase(tmp_path / "salt")
    ring = generate_keyring()
    script = tmp_path / "kms.py"
    script.write_text(f"print({ring.to_json()!r})")
    assert keyring_from_command(f"{sys.executable} {script}").keys == ring.keys
    with pytest.raises(KeyMaterialError, match="failed with exit code"):
        keyring_from_command(f"{sys.executable} -c 'raise SystemExit(3)'")


def test_interrupted_rotation_resumes_to_the_same_key(tmp_path, ring):
    files = [_sealed(tmp_path, ring, f"f{i}.sealed")[0] for i in range(4)]
    kfile = write_keyring_file(tmp_path / "keys" / "k.json", ring)
    seen = []

    def crash_after_two(path):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the operator's Ctrl-C, mid-rotation

    with pytest.raises(KeyboardInterrupt):
        rotate(kfile, [tmp_path], on_file=crash_after_two)
    mid = read_keyring_file(kfile)
    target = mid.current
    assert target != ring.current and ring.current in mid.keys  # old key kept while files still need it
    assert sorted(inspect(f).kek_id for f in files).count(target) == 2
    for f in files:  # every file opens mid-rotation
        open_bytes(f, mid)
    result = rotate(kfile, [tmp_path])  # rerun
    assert result.new_key == target and result.rewrapped == 2 and result.already == 2
    assert all(inspect(f).kek_id == target for f in files)
    assert not (tmp_path / "keys" / "k.json.rotation").exists()


def test_rewrap_changes_only_the_key_slot(tmp_path, ring):
    p, data = _sealed(tmp_path, ring)
    before, off_before = p.read_bytes(), inspect(p).data_offset
    ring2 = KeyRing(current="kek-new", keys={**ring.keys, "kek-new": os.urandom(32)})
    assert rewrap(p, ring2) is True and rewrap(p, ring2) is False
    after, info = p.read_bytes(), inspect(p)
    assert info.kek_id == "kek-new"
    assert before[off_before:] == after[info.data_offset:]  # chunks are copied, not re-encrypted
    assert bytes(open_bytes(p, ring2)[0]) == data


def test_a_crash_mid_write_leaves_the_previous_file_readable(tmp_path, ring):
    kfile = write_keyring_file(tmp_path / "k.json", ring)
    target = tmp_path / "adapter.sealed"
    seal_bytes(target, b"version one" * 100, ring, chunk_size=CHUNK)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from fedsecure.crypto import SealedWriter, read_keyring_file
        w = SealedWriter({str(target)!r}, read_keyring_file({str(kfile)!r}), chunk_size={CHUNK})
        w.write(b"version two" * 1000)
        os._exit(9)  # power cut before close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert bytes(open_bytes(target, ring)[0]) == b"version one" * 100
    assert [p.name for p in tmp_path.glob("*.sealed")] == ["adapter.sealed"]


def test_sealed_tensors_are_plain_safetensors_inside(tmp_path, ring):
    from safetensors.numpy import load

    tensors = {"b.lora_A.weight": np.random.rand(4, 8).astype(np.float32),
               "a.lora_B.weight": np.zeros((8, 4), np.float32), "scalar": np.array(3.0, np.float32)}
    p = seal_tensors(tmp_path / "t.sealed", tensors, ring, {"round": "2"}, chunk_size=64)
    out, meta = open_tensors(p, ring)
    assert meta == {"round": "2"}
    lib = load(bytes(open_bytes(p, ring)[0]))
    for k, v in tensors.items():
        assert np.array_equal(out[k], v) and np.array_equal(lib[k], v)
    assert not out["scalar"].flags.writeable  # views of the one decrypted buffer


# --------------------------------------------------------------------------- in the federation
def _plaintext_tensor_hits(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        raw = f.read_bytes()
        if len(raw) >= 10:
            (n,) = struct.unpack("<Q", raw[:8])
            if 0 < n < len(raw) and raw[8:10] == b'{"':
                hits.append(f"{f}: safetensors header")
        hits += [f"{f}: raw adapter floats" for nd in needles if nd in raw]
    return hits


def test_no_plaintext_tensors_at_rest_after_a_run(site_data, tmp_path):
    from fedsecure.launch.simulate import simulate

    summary = simulate(small_config(site_data, site={"state_dir": str(tmp_path / "state")}),
                       run_dir=tmp_path / "run")
    final = global_adapter(tmp_path / "run", summary["rounds_completed"])
    needles = [np.ascontiguousarray(v).tobytes()[:32] for v in final.values() if np.any(v)][:8]
    assert needles
    assert _plaintext_tensor_hits(tmp_path / "run", needles) == []
    assert _plaintext_tensor_hits(tmp_path / "state", needles) == []
    assert all(p.name.endswith(".sealed") for p in (tmp_path / "state").rglob("privacy-ledger-*"))
    # and with sealing off, the same scan does find them (the scan can fail)
    simulate(small_config(site_data, storage={"seal": False}, site={"storage": {"seal": False}}),
             run_dir=tmp_path / "plain")
    assert any("safetensors header" in h for h in _plaintext_tensor_hits(tmp_path / "plain", []))


def test_a_plain_ledger_is_not_ignored_when_sealing_is_on(tmp_path, ring):
    from fedsecure.errors import LedgerError
    from fedsecure.privacy.accounting import Spend
    from fedsecure.privacy.ledger import PrivacyLedger

    led = PrivacyLedger.open(tmp_path, "ab" * 32)  # sealing off: a plain ledger
    led.append(run_id="r", server_round=1, spend=Spend(1.0, 0.1, 10), delta=1e-5, accountant="rdp",
               max_grad_norm=1.0, epsilon_after=1.0, epsilon_budget=9.0)
    with pytest.raises(LedgerError, match="unsealed privacy ledger .* exists while sealing is on"):
        PrivacyLedger.open(tmp_path, "ab" * 32, ring=ring, verify_epsilon=False)


def test_sealed_ledger_is_never_silently_replaced(site_data, tmp_path):
    from fedsecure.launch.simulate import simulate

    state = tmp_path / "state"
    cfg = small_config(site_data, privacy={"noise_multiplier": 1.5, "epsilon_budget": 20.0},
                       site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0}})
    simulate(cfg, run_dir=tmp_path / "run1")
    # sealing turned off afterwards: the site must refuse, not start a fresh budget
    off = small_config(site_data, privacy={"noise_multiplier": 1.5, "epsilon_budget": 20.0},
                       site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0}, "storage": {"seal": False}})
    summary = simulate(off, run_dir=tmp_path / "run2")
    assert any("is sealed but site.storage.seal is off" in v for v in summary["rounds"][1]["failures"].values())
    # a damaged sealed ledger stops the site with a clear error
    ledger = next((state / "site-0").glob("*.sealed"))
    raw = bytearray(ledger.read_bytes())
    raw[-3] ^= 0x40
    ledger.write_bytes(bytes(raw))
    summary = simulate(cfg, run_dir=tmp_path / "run3")
    reasons = " ".join(summary["rounds"][1]["failures"].values())
    assert "site-0" in reasons and "cannot be opened" in reasons and "failed authentication" in reasons
    assert summary["privacy"]["sites"]["site-1"]["rounds_trained"] == [1]


def test_cli_seal_open_inspect_and_keys(tmp_path):
    from typer.testing import CliRunner

    from fedsecure.cli import app

    r = CliRunner()
    k = tmp_path / "k.json"
    assert r.invoke(app, ["keys", "init", "--keyring", str(k)]).exit_code == 0
    assert r.invoke(app, ["keys", "init", "--keyring", str(k)]).exit_code == 2  # no silent overwrite
    src = tmp_path / "notes.bin"
    src.write_bytes(os.urandom(5000))
    assert r.invoke(app, ["seal", str(src), "--keyring", str(k)]).exit_code == 0
    res = r.invoke(app, ["inspect", str(src) + ".sealed"])
    assert res.exit_code == 0 and json.loads(res.output)["plaintext_bytes"] == 5000
    assert r.invoke(app, ["keys", "rotate", "--keyring", str(k), str(tmp_path)]).exit_code == 0
    shown = r.invoke(app, ["keys", "show", "--keyring", str(k), "--under", str(tmp_path)])
    assert shown.exit_code == 0 and "(current, seals 1 files)" in shown.output
    assert "(old, seals 0 files)" in shown.output
    assert base64.b64encode(read_keyring_file(k).keys[read_keyring_file(k).current]).decode() not in shown.output
    out = tmp_path / "back.bin"
    assert r.invoke(app, ["open", str(src) + ".sealed", "--keyring", str(k), "--out", str(out)]).exit_code == 0
    assert out.read_bytes() == src.read_bytes()
    res = r.invoke(app, ["inspect", str(src)])  # a plain file is not sealed
    assert res.exit_code == 2 and "not a sealed fedsecure file" in res.output
    with pytest.raises(FedSecureError):
        inspect(src)


def test_independent_decryptor_from_the_spec(tmp_path, ring):
    """docs/sealed-format.md is enough to decrypt: this reader uses only the spec and AES-GCM."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(3 * 4096 + 17)
    p = seal_bytes(tmp_path / "spec.sealed", data, ring, {"who": "spec"}, chunk_size=4096)
    raw = p.read_bytes()
    assert raw[:8] == b"FSSEALED" and raw[8] == 1
    hl = int.from_bytes(raw[9:13], "big")
    header_bytes = raw[13:13 + hl]
    sl = int.from_bytes(raw[13 + hl:17 + hl], "big")
    slot = json.loads(raw[17 + hl:17 + hl + sl])
    header = json.loads(header_bytes)
    h = hashlib.sha256(b"FSSEALED" + b"\x01" + header_bytes).digest()
    kek = ring.keys[slot["kek_id"]]
    dk = AESGCM(kek).decrypt(base64.b64decode(slot["wrap_nonce"]), base64.b64decode(slot["wrapped_key"]),
                             b"fedsecure-wrap-v1" + h + slot["kek_id"].encode())
    prefix, c = base64.b64decode(header["nonce_prefix"]), header["chunk_size"]
    body = raw[17 + hl + sl:]
    stored = [body[i:i + c + 16] for i in range(0, len(body), c + 16)]
    plain = b""
    for i, chunk in enumerate(stored):
        final = i == len(stored) - 1
        plain += AESGCM(dk).decrypt(prefix + i.to_bytes(4, "big"), chunk,
                                    b"fedsecure-chunk-v1" + h + i.to_bytes(8, "big") + bytes([final]))
    assert plain == data and header["metadata"] == {"who": "spec"}
