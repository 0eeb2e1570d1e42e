"""The consortium's roster for secure aggregation: each site's name and its node public key (Ed25519).

Every party reads its own copy (a site from ``site.secagg_roster`` in its own settings, the coordinator
from ``federation.secure_aggregation.roster``): a site verifies its peers' key adverts against it, so a
coordinator cannot swap a key. The file is YAML::

    # fedsecure secure-aggregation roster
    sites:
      hospital-a: 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29   # raw key, hex

A site's node key is the one its TEE evidence binds (``<state_dir>/attestation/node-key.pem``);
``fedsecure simulate`` writes the roster of its simulated sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedsecure.errors import ConfigError


def load_roster(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """Site name -> node public key; raises ConfigError naming the file and the problem."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"secure-aggregation roster {p} cannot be read ({e.strerror or e}). Fix: point the "
                          "setting at the consortium's roster file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"secure-aggregation roster {p} is not YAML ({type(e).__name__})") from None
    sites = doc.get("sites") if isinstance(doc, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise ConfigError(f"secure-aggregation roster {p}: expected a 'sites:' mapping of site name -> node key")
    out = {}
    for name, key in sites.items():
        try:
            out[str(name)] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(key)))
        except ValueError:
            raise ConfigError(f"secure-aggregation roster {p}: the key of {name!r} is not a 32-byte Ed25519 public "
                              "key in hex") from None
    return out


def write_roster(path: str | Path, keys: Mapping[str, Ed25519PublicKey]) -> Path:
    """Write a roster (atomically) for ``keys``; returns its path."""
    import yaml

    from fedsecure._durable import atomic_write
    from fedsecure.secagg.protocol import raw

    body = yaml.safe_dump({"sites": {k: raw(v).hex() for k, v in sorted(keys.items())}}, sort_keys=False)
    return atomic_write(Path(path), ("# fedsecure secure-aggregation roster: site name -> Ed25519 node public key "
                                     "(raw, hex)\n" + body).encode(), mode=0o644)
