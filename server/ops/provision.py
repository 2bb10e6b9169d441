"""Provisioning a real federation: a CA, the SuperLink's TLS identity, one key pair per hospital.

`provision()` writes one folder per participant, each holding exactly what that participant
needs and nothing more:

    OUT/
      ca/                      the certificate authority; keep it offline
        ca.key                 (0600) signs the SuperLink certificate, nobody else needs it
        ca.crt
      coordinator/             copy to the machine that runs the SuperLink
        ca.crt
        superlink.crt          SANs: the --superlink-host names, localhost, 127.0.0.1
        superlink.key          (0600)
        supernode-keys/NAME.pub  every hospital's PUBLIC key (OpenSSH format)
        register-supernodes.txt  the exact `flwr supernode register` commands
        README.txt             how to start the SuperLink, register nodes, submit a run
      hospitals/NAME/          copy to hospital NAME only
        ca.crt                 to verify the SuperLink (server-side TLS)
        supernode.key          (0600) EC P-384, OpenSSH format: what flower-supernode loads
        supernode.pub
        README.txt             data check and the exact flower-supernode command
      provision.json           what was made (names, hosts, port, paths; no key material)

A hospital's folder never holds another hospital's private key nor the CA's. Running it
again into the same folder refuses to overwrite any private key unless `force=True`.

The key material is `server/ops/pki.py`; the READMEs and commands each participant reads
are `server/ops/handouts.py`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from server.ops.handouts import (
    CONNECTION_NAME,
    README,
    REGISTER_TXT,
    coordinator_readme,
    hospital_readme,
    register_script,
)
from server.ops.pki import (
    CA_CERT,
    CA_DIR,
    CA_KEY,
    COORDINATOR_DIR,
    HOSPITALS_DIR,
    PUBKEYS_DIR,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
    SUPERNODE_KEY,
    SUPERNODE_PUB,
    Provisioned,
    make_ca,
    make_node_keypair,
    make_server_cert,
    now,
    pem_cert,
    pem_key,
)
from shared_model.contract.run_config import DEFAULT_NODE_EPSILON_BUDGET
from shared_model.files import PRIVATE, PUBLIC, atomic_write_bytes

DEFAULT_SUPERLINK_PORT = 9092
MANIFEST = "provision.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class ProvisionError(ValueError):
    """Provisioning cannot go on (bad names, or keys that would be overwritten)."""


# ------------------------------------------------------------------ names and hosts


def parse_hospitals(text: str | Sequence[str]) -> tuple[str, ...]:
    """`"a,b,c"` (or a list) -> validated, unique hospital names, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(x.strip() for x in items if x.strip())
    if not names:
        raise ProvisionError("no hospital names given (e.g. --hospitals st-marys,charite)")
    for n in names:
        if not _NAME.match(n):
            raise ProvisionError(
                f"hospital name {n!r} is not allowed: use 1-32 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProvisionError(f"hospital names must be unique, repeated: {', '.join(dupes)}")
    return names


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The given hosts plus localhost and 127.0.0.1, deduplicated, IPs as IP entries."""
    seen: list[str] = []
    for h in [*hosts, "localhost", "127.0.0.1"]:
        h = h.strip().strip("[]")
        if h and h not in seen:
            seen.append(h)
    out: list[x509.GeneralName] = []
    for h in seen:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", h):
                raise ProvisionError(
                    f"--superlink-host {h!r} is neither a host name nor an IP"
                ) from None
            out.append(x509.DNSName(h))
    return out


def _write(path: Path, data: bytes | str, private: bool = False) -> Path:
    """Write atomically; private files are 0600 from the start (never world-readable)."""
    raw = data.encode() if isinstance(data, str) else data
    return atomic_write_bytes(path, raw, mode=PRIVATE if private else PUBLIC)


# ------------------------------------------------------------------ the whole thing


def provision(
    out: Path,
    hospitals: str | Sequence[str],
    superlink_hosts: Sequence[str] = (),
    superlink_port: int = DEFAULT_SUPERLINK_PORT,
    *,
    force: bool = False,
    epsilon_budget: float = DEFAULT_NODE_EPSILON_BUDGET,
    bind_host: str = "0.0.0.0",
    ca_days: int = 3650,
    cert_days: int = 825,
) -> Provisioned:
    """Make the CA, the SuperLink certificate and one key pair per hospital under `out`:
    check everything first, refuse to overwrite keys (unless `force`), then write."""
    names = parse_hospitals(hospitals)
    hosts = tuple(h.strip() for h in superlink_hosts if h.strip())
    sans = subject_alt_names(hosts)  # validates before anything is written
    if not 1 <= superlink_port <= 65535:
        raise ProvisionError(f"--superlink-port {superlink_port} is not a TCP port")
    if not epsilon_budget > 0:
        raise ProvisionError(f"--epsilon-budget must be > 0, got {epsilon_budget}")
    out = Path(out).resolve()
    ca_dir, coord = out / CA_DIR, out / COORDINATOR_DIR
    hosp = {n: out / HOSPITALS_DIR / n for n in names}
    _refuse_or_clear(out, coord, hosp, force)

    ca_key, ca_cert = make_ca(days=ca_days)
    sl_key, sl_cert = make_server_cert(ca_key, ca_cert, sans, hosts[0] if hosts else "localhost",
                                       days=cert_days)
    ca_pem = pem_cert(ca_cert)
    files = [
        _write(ca_dir / CA_KEY, pem_key(ca_key), private=True),
        _write(ca_dir / CA_CERT, ca_pem),
        _write(coord / CA_CERT, ca_pem),
        _write(coord / SUPERLINK_CERT, pem_cert(sl_cert)),
        _write(coord / SUPERLINK_KEY, pem_key(sl_key), private=True),
    ]
    for name, folder in hosp.items():
        files += _hospital_files(name, folder, coord, ca_pem, hosts, superlink_port,
                                 epsilon_budget)
    files.append(_write(coord / REGISTER_TXT, register_script(names)))
    files.append(
        _write(coord / README, coordinator_readme(names, hosts, superlink_port, bind_host))
    )
    manifest = {
        "hospitals": list(names),
        "superlink-hosts": list(hosts),
        "superlink-port": superlink_port,
        "connection": CONNECTION_NAME,
        "created": now().isoformat(timespec="seconds"),
        "ca-not-after": ca_cert.not_valid_after_utc.isoformat(),
        "superlink-cert-not-after": sl_cert.not_valid_after_utc.isoformat(),
    }
    files.append(_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    return Provisioned(out=out, ca_dir=ca_dir, coordinator_dir=coord, hospital_dirs=hosp,
                       superlink_hosts=hosts, superlink_port=superlink_port, files=files)


def _refuse_or_clear(out: Path, coord: Path, hosp: dict[str, Path], force: bool) -> None:
    """Existing keys stop provisioning unless `force`; a forced run replaces the whole
    federation, so no stale hospital folder or registered key stays behind."""
    secrets = [out / CA_DIR / CA_KEY, coord / SUPERLINK_KEY,
               *(d / SUPERNODE_KEY for d in hosp.values())]
    existing = [p for p in secrets if p.exists()]
    old = out / HOSPITALS_DIR
    if old.is_dir():
        existing += [p / SUPERNODE_KEY for p in sorted(old.iterdir())
                     if (p / SUPERNODE_KEY).exists() and p / SUPERNODE_KEY not in existing]
    if existing and not force:
        listed = "\n  ".join(str(p) for p in existing)
        raise ProvisionError(
            f"refusing to overwrite existing keys in {out}:\n  {listed}\n"
            "use --force to replace them (every participant then needs its new folder)"
        )
    if not force:
        return
    for p in sorted(old.iterdir()) if old.is_dir() else []:
        if p.is_dir() and p.name not in hosp:
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    for f in (coord / PUBKEYS_DIR).glob("*.pub"):
        f.unlink()


def _hospital_files(name: str, folder: Path, coord: Path, ca_pem: bytes,
                    hosts: tuple[str, ...], port: int, epsilon_budget: float) -> list[Path]:
    """One hospital's folder (its private key, never copied elsewhere) and its public key
    in the coordinator's folder."""
    private, public = make_node_keypair(f"medfuse-{name}")
    return [
        _write(folder / SUPERNODE_KEY, private, private=True),
        _write(folder / SUPERNODE_PUB, public),
        _write(folder / CA_CERT, ca_pem),
        _write(folder / README, hospital_readme(name, hosts, port, epsilon_budget)),
        _write(coord / PUBKEYS_DIR / f"{name}.pub", public),
    ]
