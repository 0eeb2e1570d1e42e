"""Known-answer vectors for the sealed format (tests/data/sealed_kat.json, docs/sealed-format.md).

Every vector is reproduced byte for byte through the deterministic seam (``_seal_from_parts``), through
the public writers with their random parts pinned, and through an encoder written from the spec alone;
every vector opens with the public API; flipped bits in the header, the key slot, a chunk or a tag
fail with ``IntegrityError``; and the doc's section holds exactly the JSON file's vectors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecure.crypto import SealedWriter, inspect, open_bytes, open_to_file, seal_bytes, seal_file
from fedsecure.crypto import sealed as sealed_mod
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.layout import SealParts
from fedsecure.crypto.sealed import TAG, _fresh_parts, _seal_from_parts
from fedsecure.errors import IntegrityError, KeyMaterialError

ROOT = Path(__file__).resolve().parents[1]
KAT_FILE = ROOT / "tests" / "data" / "sealed_kat.json"
DOC = ROOT / "docs" / "sealed-format.md"
KAT = json.loads(KAT_FILE.read_text(encoding="utf-8"))
VECTORS = KAT["vectors"]
NAMES = [v["name"] for v in VECTORS]
PARTS = {k: bytes.fromhex(h) for k, h in KAT["parts"].items()}
KEK_ID = KAT["kek_id"]
KEK = bytes.fromhex(KAT["kek_hex"])
BIG = 1024  # vectors longer than this are printed in the doc as length, SHA-256, head and tail


def _ring() -> KeyRing:
    return KeyRing(current=KEK_ID, keys={KEK_ID: KEK})


def _plaintext(v: dict) -> bytes:
    if "plaintext_rule" in v:
        assert v["plaintext_rule"] == "i mod 251"
        return bytes(i % 251 for i in range(v["plaintext_len"]))
    return bytes.fromhex(v["plaintext_hex"])


def _sealed(v: dict) -> bytes:
    return bytes.fromhex(v["sealed_hex"])


def _layout(sealed: bytes) -> tuple[int, int, int]:
    """Header length, slot length, offset of chunk 0."""
    hl = int.from_bytes(sealed[9:13], "big")
    sl = int.from_bytes(sealed[13 + hl:17 + hl], "big")
    return hl, sl, 17 + hl + sl


def _chunk_spans(v: dict, sealed: bytes) -> list[tuple[int, int]]:
    """(start, end) of each stored chunk, ciphertext and tag."""
    c, n, pos = v["chunk_size"], v["plaintext_len"], _layout(sealed)[2]
    sizes = [min(c, n - i) for i in range(0, n, c)] or [0]
    spans = []
    for size in sizes:
        spans.append((pos, pos + size + TAG))
        pos += size + TAG
    assert pos == len(sealed)
    return spans


# ------------------------------------------------------------------ the vectors themselves


def test_the_vectors_cover_the_cases_and_are_self_consistent():
    assert KAT["format_version"] == 1 and len(set(NAMES)) == len(NAMES)
    assert {"empty", "short", "one-chunk", "multi-chunk", "metadata"} <= set(NAMES)
    by_name = {v["name"]: v for v in VECTORS}
    assert by_name["empty"]["plaintext_len"] == 0
    assert by_name["one-chunk"]["plaintext_len"] == by_name["one-chunk"]["chunk_size"]
    assert by_name["one-chunk"]["chunks"] == 1
    assert by_name["multi-chunk"]["chunks"] > 1 and by_name["multi-chunk"]["chunk_size"] == 4096
    assert by_name["metadata"]["metadata"]
    for v in VECTORS:
        pt, sealed = _plaintext(v), _sealed(v)
        hl, sl, _ = _layout(sealed)
        assert len(pt) == v["plaintext_len"] and hashlib.sha256(pt).hexdigest() == v["plaintext_sha256"]
        assert len(sealed) == v["sealed_len"] and hashlib.sha256(sealed).hexdigest() == v["sealed_sha256"]
        assert sealed[13:13 + hl] == v["header"].encode("ascii")
        assert sealed[17 + hl:17 + hl + sl] == v["slot"].encode("ascii")
        assert len(_chunk_spans(v, sealed)) == v["chunks"]


@pytest.mark.parametrize("v", VECTORS, ids=NAMES)
def test_the_seam_reproduces_each_vector_byte_for_byte(v):
    got = _seal_from_parts(_plaintext(v), _ring(), v["metadata"], v["chunk_size"], **PARTS)
    assert got == _sealed(v)


@pytest.mark.parametrize("v", VECTORS, ids=NAMES)
def test_the_public_writers_write_the_vector_bytes_when_their_parts_are_pinned(v, tmp_path, monkeypatch):
    """The public writers run the seam: pin the one random draw and they write the vector."""
    monkeypatch.setattr(sealed_mod, "_fresh_parts", lambda: SealParts(**PARTS))
    pt, c, want = _plaintext(v), v["chunk_size"], _sealed(v)
    assert seal_bytes(tmp_path / "a.sealed", pt, _ring(), v["metadata"], chunk_size=c).read_bytes() == want
    src = tmp_path / "plain.bin"
    src.write_bytes(pt)
    assert seal_file(src, tmp_path / "b.sealed", _ring(), v["metadata"], chunk_size=c).read_bytes() == want
    with SealedWriter(tmp_path / "c.sealed", _ring(), v["metadata"], chunk_size=c) as w:
        view, sizes, k = memoryview(pt), [1, 7, c - 1, c + 1, 2 * c, 0], 0
        while len(view):  # uneven pieces across chunk boundaries
            w.write(view[: sizes[k % len(sizes)]])
            view, k = view[sizes[k % len(sizes)]:], k + 1
    assert (tmp_path / "c.sealed").read_bytes() == want


def _seal_per_the_spec(v: dict) -> bytes:
    """An encoder written from the doc's "How to reproduce" steps: struct-free, fedsecure-free."""
    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    c, pt = v["chunk_size"], _plaintext(v)
    header = json.dumps({"chunk_size": c, "cipher": "AES-256-GCM", "file_id": b64(PARTS["file_id"]),
                         "metadata": v["metadata"], "nonce_prefix": b64(PARTS["nonce_prefix"])},
                        sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(b"FSSEALED" + b"\x01" + header).digest()
    wrapped = AESGCM(KEK).encrypt(PARTS["wrap_nonce"], PARTS["data_key"], b"fedsecure-wrap-v1" + h + KEK_ID.encode())
    slot = json.dumps({"kek_id": KEK_ID, "wrap_nonce": b64(PARTS["wrap_nonce"]), "wrapped_key": b64(wrapped)},
                      sort_keys=True).encode()
    pieces = [pt[i:i + c] for i in range(0, len(pt), c)] or [b""]
    aead = AESGCM(PARTS["data_key"])
    chunks = b"".join(
        aead.encrypt(PARTS["nonce_prefix"] + i.to_bytes(4, "big"), piece,
                     b"fedsecure-chunk-v1" + h + i.to_bytes(8, "big") + bytes([i == len(pieces) - 1]))
        for i, piece in enumerate(pieces))
    return (b"FSSEALED" + b"\x01" + len(header).to_bytes(4, "big") + header + len(slot).to_bytes(4, "big") + slot
            + chunks)


@pytest.mark.parametrize("v", VECTORS, ids=NAMES)
def test_the_spec_recipe_alone_reproduces_each_vector(v):
    assert _seal_per_the_spec(v) == _sealed(v)


@pytest.mark.parametrize("v", VECTORS, ids=NAMES)
def test_each_vector_opens_with_the_public_api(v, tmp_path):
    p = tmp_path / f"{v['name']}.sealed"
    p.write_bytes(_sealed(v))
    data, meta = open_bytes(p, _ring())
    assert bytes(data) == _plaintext(v) and meta == v["metadata"]
    assert open_to_file(p, tmp_path / "out.bin", _ring()).read_bytes() == _plaintext(v)
    info = inspect(p)
    assert (info.kek_id, info.chunk_size, info.plaintext_size, info.metadata) == (
        KEK_ID, v["chunk_size"], v["plaintext_len"], v["metadata"])


def test_fresh_parts_are_fresh_and_the_public_writers_still_draw_them(tmp_path):
    a, b = _fresh_parts(), _fresh_parts()
    assert all(getattr(a, f) != getattr(b, f) for f in ("data_key", "nonce_prefix", "file_id", "wrap_nonce"))
    assert "data_key" not in repr(a) and a.data_key.hex() not in repr(a)
    v = VECTORS[1]
    one = seal_bytes(tmp_path / "1.sealed", _plaintext(v), _ring(), v["metadata"], chunk_size=v["chunk_size"])
    two = seal_bytes(tmp_path / "2.sealed", _plaintext(v), _ring(), v["metadata"], chunk_size=v["chunk_size"])
    assert one.read_bytes() != two.read_bytes() and one.read_bytes() != _sealed(v)
    assert bytes(open_bytes(one, _ring())[0]) == bytes(open_bytes(two, _ring())[0]) == _plaintext(v)


@pytest.mark.parametrize("field,size", [("data_key", 32), ("nonce_prefix", 8), ("file_id", 16), ("wrap_nonce", 12)])
def test_the_seam_refuses_parts_of_the_wrong_size(field, size):
    for bad in (b"\x00" * (size - 1), b"\x00" * (size + 1)):
        with pytest.raises(ValueError, match=field):
            _seal_from_parts(b"x", _ring(), None, 16, **{**PARTS, field: bad})
    with pytest.raises(ValueError, match="chunk_size"):
        _seal_from_parts(b"x", _ring(), None, 0, **PARTS)


# ------------------------------------------------------------------ tampering

# magic, version and the two lengths; header JSON; key slot JSON; chunk ciphertexts; chunk tags
REGIONS = ["layout", "header", "slot", "ciphertext", "tag"]


def _flips(v: dict, region: str, exhaustive: bool) -> list[tuple[int, int]]:
    """(byte, bit) flips in one region: every bit of every byte, or one bit per byte (all bits of the
    fixed fields and tags); ciphertext of a long vector is sampled at both ends of each chunk."""
    sealed = _sealed(v)
    hl, _, off = _layout(sealed)
    spans = _chunk_spans(v, sealed)
    if region == "layout":
        positions, all_bits = [*range(13), *range(13 + hl, 17 + hl)], True
    elif region == "header":
        positions, all_bits = list(range(13, 13 + hl)), exhaustive
    elif region == "slot":
        positions, all_bits = list(range(17 + hl, off)), exhaustive
    elif region == "tag":
        positions, all_bits = [p for _, end in spans for p in range(end - TAG, end)], True
    else:
        ct = [range(start, end - TAG) for start, end in spans]
        if len(sealed) > BIG:
            ct = [r if len(r) <= 64 else [*r[:32], *r[-32:]] for r in ct]
        positions, all_bits = [p for r in ct for p in r], exhaustive
    return [(p, b) for p in positions for b in (range(8) if all_bits else [p % 8])]


def _kek_id_span(v: dict) -> range:
    """Bytes of the slot's kek_id value: a flip there names another key (KeyMaterialError, by the spec)."""
    hl = _layout(_sealed(v))[0]
    start = 17 + hl + v["slot"].index('"kek_id": "') + len('"kek_id": "')
    return range(start, start + len(KEK_ID))


def _assert_every_flip_fails(v: dict, flips: list[tuple[int, int]], path: Path) -> None:
    sealed, ring, kek_span = _sealed(v), _ring(), _kek_id_span(v)
    assert flips
    for pos, bit in flips:
        bad = bytearray(sealed)
        bad[pos] ^= 1 << bit
        path.write_bytes(bad)
        allowed = (IntegrityError, KeyMaterialError) if pos in kek_span else (IntegrityError,)
        try:
            open_bytes(path, ring)
        except allowed:
            continue
        except Exception as e:  # noqa: BLE001 - report which flip raised what
            pytest.fail(f"{v['name']}: flipping bit {bit} of byte {pos} raised {type(e).__name__}: {e}")
        pytest.fail(f"{v['name']}: flipping bit {bit} of byte {pos} still opened")


# every (vector, region) pair that has bytes: the empty plaintext's one chunk has a tag and no ciphertext
FLIP_CASES = [pytest.param(v, r, id=f"{v['name']}-{r}") for v in VECTORS for r in REGIONS if _flips(v, r, False)]


@pytest.mark.parametrize("v,region", FLIP_CASES)
def test_a_flipped_bit_in_any_region_fails_to_open(v, region, tmp_path):
    _assert_every_flip_fails(v, _flips(v, region, exhaustive=False), tmp_path / "bad.sealed")


@pytest.mark.slow
@pytest.mark.parametrize("v,region", FLIP_CASES)
def test_every_flipped_bit_in_every_region_fails_to_open(v, region, tmp_path):
    _assert_every_flip_fails(v, _flips(v, region, exhaustive=True), tmp_path / "bad.sealed")


@pytest.mark.parametrize("field", ["wrapped_key", "wrap_nonce"])
@pytest.mark.parametrize("v", VECTORS, ids=NAMES)
def test_a_flipped_bit_in_the_wrapped_key_or_its_nonce_fails_to_open(v, field, tmp_path):
    """Flip bits of the decoded value (ciphertext and tag of the wrapped key), not of its base64 text."""
    sealed = _sealed(v)
    hl, _, off = _layout(sealed)
    slot = json.loads(v["slot"])
    raw = base64.b64decode(slot[field])
    p = tmp_path / "bad.sealed"
    for i in range(len(raw)):
        for bit in (range(8) if i >= len(raw) - TAG else [i % 8]):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            new_slot = json.dumps({**slot, field: base64.b64encode(bad).decode()}, sort_keys=True).encode()
            p.write_bytes(sealed[:13 + hl] + len(new_slot).to_bytes(4, "big") + new_slot + sealed[off:])
            with pytest.raises(IntegrityError):
                open_bytes(p, _ring())


# ------------------------------------------------------------------ the doc and the JSON file agree

_FIELD = re.compile(r"([a-z0-9_]+):(?: (.*))?")
_INTS = {"chunk_size", "plaintext_len", "chunks", "sealed_len"}


def _doc_blocks() -> list[dict]:
    """The ```text blocks of the doc's "Known-answer vectors" section, as dicts (hex lines joined)."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## Known-answer vectors\n")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end == -1 else text[start:end]
    blocks = []
    for body in re.findall(r"^```text\n(.*?)^```$", section, flags=re.S | re.M):
        fields: dict = {}
        key = None
        for line in body.splitlines():
            m = _FIELD.fullmatch(line)
            if m:
                key = m.group(1)
                assert key not in fields, f"doc: {key} twice in one block"
                fields[key] = m.group(2) or ""
            else:
                assert key is not None and re.fullmatch(r"[0-9a-f]+", line), f"doc: stray line {line!r}"
                fields[key] += line
        for key in _INTS & fields.keys():
            fields[key] = int(fields[key])
        if "metadata" in fields:
            fields["metadata"] = json.loads(fields["metadata"])
        blocks.append(fields)
    return blocks


def test_the_doc_and_the_json_file_hold_the_same_vectors():
    inputs, *vectors = _doc_blocks()
    assert inputs == {"kek_id": KEK_ID, "kek": KAT["kek_hex"], **KAT["parts"]}
    assert [d.get("name") for d in vectors] == NAMES
    for doc, v in zip(vectors, VECTORS, strict=True):
        want = {k: x for k, x in v.items() if k != "sealed_hex"}
        if "sealed_hex" in doc:
            want["sealed_hex"] = v["sealed_hex"]
        else:  # printed short: length, SHA-256, first and last 64 bytes
            assert v["sealed_len"] > BIG, f"{v['name']}: short enough to print sealed_hex in full"
            want["sealed_head_hex"], want["sealed_tail_hex"] = v["sealed_hex"][:128], v["sealed_hex"][-128:]
        assert doc == want, v["name"]
