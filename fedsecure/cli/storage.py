"""``fedsecure keys``, ``seal``, ``open``, ``inspect``: sealed storage and its keys."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.errors import FedSecureError


@friendly
def keys_init(
    keyring: Path = typer.Option(..., help="Keyring file to create (mode 0600)."),
    force: bool = typer.Option(False, help="Overwrite an existing keyring (its keys are lost)."),
) -> None:
    """Create a keyring with one fresh 256-bit key-encryption key."""
    from fedsecure.crypto import generate_keyring, write_keyring_file

    ring = generate_keyring()
    write_keyring_file(keyring, ring, force=force)
    console.print(f"created {keyring} (0600) with key {ring.current}. Keep it apart from the data it protects.",
                  highlight=False)


@friendly
def keys_show(
    keyring: Path = typer.Option(..., help="Keyring file."),
    under: list[Path] = typer.Option([], help="Also count which key seals the *.sealed files under these paths."),
) -> None:
    """Key ids and fingerprints (never key bytes); optionally which files each key seals."""
    from fedsecure.crypto import read_keyring_file
    from fedsecure.crypto.rotation import key_usage

    ring = read_keyring_file(keyring)
    view = ring.public_view()
    usage = key_usage(under) if under else {}
    for kid, fp in view["keys"].items():
        mark = "current" if kid == view["current"] else "old"
        extra = f", seals {usage.get(kid, 0)} files" if under else ""
        console.print(f"{kid}  fingerprint {fp}  ({mark}{extra})", highlight=False)
    for kid in sorted(set(usage) - set(view["keys"])):
        if kid in ring.retired:  # this keyring dropped it while files still need it: they cannot be opened
            console.print(f"[red]{kid}: seals {usage[kid]} files but was RETIRED from this keyring (add the old key "
                          "back to open them)[/]", highlight=False)
        else:
            console.print(f"{kid}: seals {usage[kid]} files under another keyring (e.g. a site's in a run "
                          "directory)", highlight=False)


@friendly
def keys_rotate(
    keyring: Path = typer.Option(..., help="Keyring file; gets a new current key."),
    paths: list[Path] = typer.Argument(..., help="Sealed files or folders whose *.sealed files to re-wrap (files "
                                       "sealed under other keyrings are skipped and listed)."),
    retire: bool = typer.Option(False, help="Drop the old keys once every file of this keyring is re-wrapped "
                                "(refused while one still needs them)."),
) -> None:
    """Re-wrap every data key under a new key-encryption key (data is not re-encrypted; resumable)."""
    from fedsecure.crypto.rotation import rotate

    r = rotate(keyring, paths, retire=retire)
    console.print(f"current key {r.new_key}: re-wrapped {r.rewrapped} files, {r.already} already done"
                  + (f"; retired {', '.join(r.retired)}" if r.retired else ""), highlight=False)
    if not r.skipped:
        return
    dirs = [p for p in paths if p.is_dir()]

    def shown(f: Path) -> str:
        return next((str(f.relative_to(d)) for d in dirs if f.is_relative_to(d)), str(f))

    console.print(f"skipped {len(r.skipped)} files sealed under other keyrings (rotate them with their own "
                  "keyring):", highlight=False)
    for f, kid in r.skipped:
        console.print(f"  {shown(f)} (key {kid})", highlight=False)
    if r.rewrapped + r.already == 0:
        console.print(f"[yellow]no file under {', '.join(map(str, paths))} is sealed under {keyring}: is it the "
                      "keyring you meant?[/]", highlight=False)


@friendly
def seal_cmd(
    file: Path = typer.Argument(..., help="Plain file to seal."),
    keyring: Path = typer.Option(..., help="Keyring file (its current key seals)."),
    out: Path | None = typer.Option(None, help="Output (default FILE.sealed)."),
) -> None:
    """Seal a file (chunked AES-256-GCM, streaming; see docs/sealed-format.md)."""
    from fedsecure.crypto import read_keyring_file, seal_file

    if not file.is_file():
        raise FedSecureError(f"{file} is not a file")
    dst = seal_file(file, out or file.with_name(file.name + ".sealed"), read_keyring_file(keyring),
                    {"original-name": file.name})
    console.print(str(dst), highlight=False)


@friendly
def open_cmd(
    file: Path = typer.Argument(..., help="Sealed file."),
    keyring: Path = typer.Option(..., help="Keyring file holding the key that sealed it."),
    out: Path = typer.Option(..., help="Where to write the plaintext (written only if it authenticates)."),
) -> None:
    """Decrypt a sealed file for an operator (nothing is written unless every chunk authenticates)."""
    from fedsecure.crypto import open_to_file, read_keyring_file

    console.print(str(open_to_file(file, out, read_keyring_file(keyring))), highlight=False)


@friendly
def inspect_cmd(file: Path = typer.Argument(..., help="Sealed file.")) -> None:
    """Show a sealed file's header and key id without decrypting anything (no key needed)."""
    from fedsecure.crypto import inspect

    info = inspect(file)
    console.print_json(data={"file": str(info.path), "format_version": 1, "cipher": info.header["cipher"],
                             "chunk_size": info.chunk_size, "kek_id": info.kek_id,
                             "plaintext_bytes": info.plaintext_size, "metadata": info.metadata})
