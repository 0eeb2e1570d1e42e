"""Key-encryption keys (KEKs), named by id, from a provider; a keyring keeps old ids for opening.

Providers (``storage.key_provider``):

* ``file``: a keyring JSON file ``{"current": id, "keys": {id: base64(32 bytes)}}``; refused unless
  its permissions are 0600 (no group/other access). A keyring that rotation retired keys from also
  lists their ids, ``"retired": [id, ...]`` (ids only), so a file still sealed under one is told apart
  from a file of another keyring.
* ``env``: ``FEDSECURE_KEK`` holds base64(32 bytes), ``FEDSECURE_KEK_ID`` its id (default ``env``).
* ``passphrase``: ``FEDSECURE_PASSPHRASE`` through scrypt (n=2^15, r=8, p=1) with a salt kept in a
  small public file beside the data; the id derives from the salt.
* ``command``: an external program (a KMS or HSM client) that prints the keyring JSON on stdout.

Keys live apart from the data they protect in deployment; the simulation's auto-created keyring
file under the run directory is a demo convenience and says so.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedsecure.errors import KeyMaterialError

KEY_BYTES = 32


@dataclass
class KeyRing:
    """Key-encryption keys by id: ``current`` seals new files, every id can open.

    Attributes:
        current: The id that wraps the data keys of new files; must be among ``keys``.
        keys: Id to 32 key bytes.
        retired: Ids this keyring held and dropped (``fedsecure keys rotate --retire``); no key bytes.

    Raises:
        KeyMaterialError: ``current`` is missing from ``keys``, or a key is not 32 bytes.
    """

    current: str
    keys: dict[str, bytes] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise KeyMaterialError(
                f"keyring: current key id {self.current!r} is not among its keys {sorted(self.keys)}"
            )
        for kid, k in self.keys.items():
            if len(k) != KEY_BYTES:
                raise KeyMaterialError(f"keyring: key {kid!r} is {len(k)} bytes; keys are {KEY_BYTES} random bytes")

    def get(self, kid: str) -> bytes:
        """The key with id ``kid``.

        Raises:
            KeyMaterialError: No key has that id (the message names the ids the ring holds).
        """
        if kid not in self.keys and kid in self.retired:
            raise KeyMaterialError(
                f"key {kid!r} was retired from this keyring (it holds {', '.join(sorted(self.keys))}) while a file "
                "still needed it. Fix: add the old key back to the keyring (from a backup), then finish "
                "`fedsecure keys rotate`."
            )
        if kid not in self.keys:
            raise KeyMaterialError(
                f"no key with id {kid!r} in the keyring (it holds {', '.join(sorted(self.keys))}). "
                "Fix: add the old key back to the keyring, or finish `fedsecure keys rotate`."
            )
        return self.keys[kid]

    def to_json(self) -> str:
        """The keyring file's JSON, ``{"current": id, "keys": {id: base64}}`` (and ``"retired": [id, ...]`` once
        rotation retired keys); holds the key bytes.
        """
        doc: dict = {"current": self.current, "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}}
        if self.retired:
            doc["retired"] = sorted(self.retired)
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> KeyRing:
        """Parse keyring JSON.

        Args:
            text: ``{"current": id, "keys": {id: base64 of 32 bytes}}``.
            source: Where the text came from, for error messages.

        Returns:
            The keyring.

        Raises:
            KeyMaterialError: The text is not a valid keyring.
        """
        try:
            raw = json.loads(text)
            retired = raw.get("retired", [])
            if not isinstance(retired, list):
                raise TypeError("'retired' must be a list of key ids")
            return cls(
                current=str(raw["current"]),
                keys={str(k): base64.b64decode(v, validate=True) for k, v in raw["keys"].items()},
                retired=[str(k) for k in retired],
            )
        except KeyMaterialError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyMaterialError(
                f"{source} is not a keyring ({type(e).__name__}: {e}). It must be JSON "
                '{"current": id, "keys": {id: base64 of 32 bytes}}.'
            ) from None

    def public_view(self) -> dict:
        """Ids and fingerprints only, never key bytes: safe to log or print."""
        import hashlib

        return {
            "current": self.current,
            "keys": {
                k: hashlib.sha256(b"fedsecure-kek-fingerprint" + v).hexdigest()[:16]
                for k, v in sorted(self.keys.items())
            },
        }


def new_key_id() -> str:
    """A fresh random key id, ``kek-`` and 8 hex digits."""
    return "kek-" + secrets.token_hex(4)


def generate_keyring() -> KeyRing:
    """A new keyring with one random 32-byte KEK under a fresh id."""
    kid = new_key_id()
    return KeyRing(current=kid, keys={kid: secrets.token_bytes(KEY_BYTES)})


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyMaterialError(
            f"key file {path} has permissions {oct(mode & 0o777)}; it must be readable by its owner "
            f"only. Fix: chmod 600 {path}"
        )


def read_keyring_file(path: str | Path) -> KeyRing:
    """Read a keyring file, refusing one that group or others may access.

    Raises:
        KeyMaterialError: The file is missing, has group or other permission bits, or is not a keyring.
    """
    p = Path(path)
    if not p.is_file():
        raise KeyMaterialError(
            f"key file {p} does not exist. Fix: create one with `fedsecure keys init --keyring {p}`."
        )
    _check_private(p)
    return KeyRing.from_json(p.read_text(encoding="utf-8"), str(p))


def write_keyring_file(path: str | Path, ring: KeyRing, *, force: bool = False) -> Path:
    """Write a keyring file atomically with mode 0600 (created so, never widened).

    Args:
        path: The keyring file.
        ring: The keyring to write.
        force: Overwrite an existing file (rotation does); refused otherwise.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        KeyMaterialError: The file exists and ``force`` is false.
    """
    p = Path(path)
    if p.exists() and not force:
        raise KeyMaterialError(f"{p} already exists; refusing to overwrite keys. Fix: pass --force, or rotate instead.")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, ring.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p


def keyring_from_env() -> KeyRing:
    """The one-key ring in ``FEDSECURE_KEK`` (base64 of 32 bytes) under id ``FEDSECURE_KEK_ID`` (default ``env``).

    Raises:
        KeyMaterialError: ``FEDSECURE_KEK`` is unset or not base64 of 32 bytes.
    """
    raw = os.environ.get("FEDSECURE_KEK")
    if not raw:
        raise KeyMaterialError(
            "FEDSECURE_KEK is not set. Fix: export FEDSECURE_KEK=$(head -c32 /dev/urandom | base64)."
        )
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise KeyMaterialError("FEDSECURE_KEK is not valid base64.") from None
    kid = os.environ.get("FEDSECURE_KEK_ID", "env")
    return KeyRing(current=kid, keys={kid: key})


def keyring_from_passphrase(salt_file: str | Path) -> KeyRing:
    """The one-key ring derived from ``FEDSECURE_PASSPHRASE`` with scrypt (n=2^15, r=8, p=1).

    Args:
        salt_file: Holds the 16-byte salt (base64); created with a fresh salt if missing. The key id
            is ``pp-`` and the salt's first 8 hex digits.

    Raises:
        KeyMaterialError: The passphrase is unset or shorter than 12 characters.
    """
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    phrase = os.environ.get("FEDSECURE_PASSPHRASE")
    if not phrase:
        raise KeyMaterialError("FEDSECURE_PASSPHRASE is not set (storage.key_provider is passphrase).")
    if len(phrase) < 12:
        raise KeyMaterialError("FEDSECURE_PASSPHRASE is shorter than 12 characters; use a long passphrase.")
    p = Path(salt_file)
    if p.exists():
        salt = base64.b64decode(p.read_text().strip())
    else:
        salt = secrets.token_bytes(16)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(base64.b64encode(salt).decode() + "\n")
    key = Scrypt(salt=salt, length=KEY_BYTES, n=2**15, r=8, p=1).derive(phrase.encode())
    kid = "pp-" + salt.hex()[:8]
    return KeyRing(current=kid, keys={kid: key})


def keyring_from_command(command: str) -> KeyRing:
    """The keyring an external program (a KMS or HSM client) prints as JSON on stdout.

    Args:
        command: The command line, split with :func:`shlex.split` and run without a shell (60 s limit).

    Raises:
        KeyMaterialError: The command cannot run, fails, or prints something that is not a keyring.
    """
    try:
        out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KeyMaterialError(f"key command {command!r} could not run: {e}") from None
    if out.returncode != 0:
        raise KeyMaterialError(
            f"key command {command!r} failed with exit code {out.returncode}: {out.stderr.strip()[:200]}"
        )
    return KeyRing.from_json(out.stdout, f"output of key command {command!r}")


def load_keyring(
    provider: str,
    *,
    keyring_path: str | Path | None,
    default_path: Path,
    key_command: str | None = None,
    create_default: bool = True,
) -> KeyRing:
    """The keyring for one party (the coordinator or a site) from the configured provider.

    With the ``file`` provider and no explicit path, the party's default keyring file is created
    on first use (simulation convenience; in deployment point ``storage.keyring`` at a key file kept
    apart from the data, or use ``env``/``command``). An explicit path must already exist.

    Args:
        provider: ``file``, ``env``, ``passphrase`` or ``command``.
        keyring_path: The configured keyring file (``file``), or the base of the salt file (``passphrase``).
        default_path: The party's default keyring file.
        key_command: The command for the ``command`` provider.
        create_default: Create the default keyring file if it is missing (``file`` provider only).

    Returns:
        The keyring.

    Raises:
        KeyMaterialError: The provider cannot supply a valid keyring.
    """
    if provider == "env":
        return keyring_from_env()
    if provider == "command":
        return keyring_from_command(str(key_command))
    if provider == "passphrase":
        return keyring_from_passphrase(Path(keyring_path or default_path).with_suffix(".salt"))
    if keyring_path:
        return read_keyring_file(keyring_path)
    if not default_path.exists() and create_default:
        write_keyring_file(default_path, generate_keyring())
    return read_keyring_file(default_path)
