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

No flwr import here: keys and certificates are made with `cryptography`, in the formats
Flower 1.42 loads (`load_ssh_private_key` for `--auth-supernode-private-key`,
`load_ssh_public_key` for `flwr supernode register`, PEM for TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.files import PRIVATE, PUBLIC, atomic_write_bytes
from shared_model.run_config import DEFAULT_NODE_EPSILON_BUDGET

# Environment every Flower process needs offline (no update check, no telemetry, no Ray
# usage stats). Written into every command a human copies; `server.supervisor`
# builds the environment of every process medfuse starts from this same table.
OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Flower's SuperExec, which starts each ServerApp and ClientApp process, looks for new work
# every 1 s by default: on the path of every message. A tenth of a second costs nothing
# measurable (one local HTTP call).
PROMPT_ENV: dict[str, str] = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
FLOWER_ENV: dict[str, str] = {**OFFLINE_ENV, **PROMPT_ENV}  # what every Flower process gets

DEFAULT_SUPERLINK_PORT = 9092
CONNECTION_NAME = "medfuse"  # the [superlink.NAME] entry in the coordinator's config.toml

CA_DIR = "ca"
COORDINATOR_DIR = "coordinator"
HOSPITALS_DIR = "hospitals"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUB = "supernode.pub"
PUBKEYS_DIR = "supernode-keys"
REGISTER_TXT = "register-supernodes.txt"
README = "README.txt"
MANIFEST = "provision.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_CURVE = ec.SECP384R1


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the named uses on (cryptography wants all nine)."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    unknown = set(allowed) - set(uses)
    if unknown:
        raise ValueError(f"unknown key usage(s): {sorted(unknown)}")
    return x509.KeyUsage(**{u: allowed.get(u, False) for u in uses})


class ProvisionError(ValueError):
    """Provisioning cannot go on (bad names, or keys that would be overwritten)."""


@dataclass(frozen=True)
class Provisioned:
    """Where everything went."""

    out: Path
    ca_dir: Path
    coordinator_dir: Path
    hospital_dirs: dict[str, Path]
    superlink_hosts: tuple[str, ...]
    superlink_port: int
    files: list[Path] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.coordinator_dir / CA_CERT

    @property
    def superlink_cert(self) -> Path:
        return self.coordinator_dir / SUPERLINK_CERT

    @property
    def superlink_key(self) -> Path:
        return self.coordinator_dir / SUPERLINK_KEY

    def public_key(self, hospital: str) -> Path:
        return self.coordinator_dir / PUBKEYS_DIR / f"{hospital}.pub"

    def private_key(self, hospital: str) -> Path:
        return self.hospital_dirs[hospital] / SUPERNODE_KEY

    def hospital_ca_cert(self, hospital: str) -> Path:
        return self.hospital_dirs[hospital] / CA_CERT


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


# ------------------------------------------------------------------ key material


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfuse federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = _name("medfuse federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    sans = subject_alt_names(hosts)
    cn = hosts[0] if hosts else "localhost"
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_agreement=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keypair(comment: str) -> tuple[bytes, bytes]:
    """(private OpenSSH PEM, public OpenSSH line) of a fresh EC P-384 key."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes | str, private: bool = False) -> Path:
    """Write atomically; private files are 0600 from the start (never world-readable)."""
    raw = data.encode() if isinstance(data, str) else data
    return atomic_write_bytes(path, raw, mode=PRIVATE if private else PUBLIC)


# ------------------------------------------------------------------ commands for humans


def env_prefix() -> str:
    return " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())


def node_config_string(
    data_path: str,
    site_name: str,
    device: str = "auto",
    epsilon_budget: float | None = DEFAULT_NODE_EPSILON_BUDGET,
    state_dir: str | None = None,
    release_compute_time: bool = False,
) -> str:
    """The `--node-config` value the ClientApp reads (TOML values, strings quoted).
    `release_compute_time`: the node sends how long each message took, without DP (a
    rehearsal or a benchmark on one's own machines, never a hospital's default).

    Flower splits the string on spaces outside quotes and has no escapes inside them, so a
    string is double-quoted, or single-quoted (TOML literal) when it holds `"` or `\\`.
    """

    def q(s: str) -> str:
        if '"' not in s and "\\" not in s:
            return f'"{s}"'
        if "'" not in s:
            return f"'{s}'"
        raise ValueError(f"{s!r}: a node-config value cannot hold both ' and \"")

    parts = [
        f"data-path={q(data_path)}",
        f"site-name={q(site_name)}",
        f"device={q(device)}",
    ]
    if epsilon_budget is not None:  # None: the node's own default (8), lowered by a run
        parts.append(f"epsilon-budget={float(epsilon_budget)!r}")
    if state_dir is not None:
        parts.append(f"state-dir={q(state_dir)}")
    if release_compute_time:
        parts.append("release-compute-time=true")
    return " ".join(parts)


def register_command(pubkey: str, hospital: str, connection: str = CONNECTION_NAME) -> str:
    return (
        f"{env_prefix()} flwr supernode register {shlex.quote(pubkey)} {connection}"
        f" --name {shlex.quote(hospital)}"
    )


def _superlink_address(hosts: Sequence[str], port: int) -> str:
    host = hosts[0] if hosts else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _coordinator_readme(
    hospitals: Sequence[str], hosts: Sequence[str], port: int, bind_host: str
) -> str:
    address = _superlink_address(hosts, port)
    regs = "\n".join(
        f"  flwr supernode register {PUBKEYS_DIR}/{shlex.quote(h)}.pub {CONNECTION_NAME}"
        f" --name {shlex.quote(h)}"
        for h in hospitals
    )
    exports = env_prefix()
    return f"""medfuse coordinator: what this folder is for
=============================================

Files: ca.crt (the federation's CA certificate), superlink.crt / superlink.key (the
SuperLink's TLS identity, key readable by you only), {PUBKEYS_DIR}/ (each hospital's
PUBLIC key), {REGISTER_TXT} (the commands that admit them). The CA's private key is
NOT here: it stays in the provisioning folder's ca/ (keep it offline).

0. In every shell that runs a Flower command (no telemetry, no update check):

  export {exports}

1. Start the SuperLink from this folder (TLS, node authentication, a state database):

  flower-superlink \\
      --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key \\
      --enable-supernode-auth --database superlink.db \\
      --disable-runtime-dependency-installation \\
      --host {bind_host} --port {port}

   Open TCP port {port} to the hospitals (and to whoever runs `flwr`). Nothing else.

2. Tell the flwr CLI where the SuperLink is: in $FLWR_HOME/config.toml (default
   ~/.flwr/config.toml) add

  [superlink.{CONNECTION_NAME}]
  address = "{address}"
  root-certificates = "/ABSOLUTE/PATH/TO/THIS/FOLDER/ca.crt"

3. Admit the hospitals, from this folder (once; the node id stays with the key):

{regs}

   Who is connected:  flwr supernode list {CONNECTION_NAME}

4. Submit the app from the medfuse project folder and follow it:

  flwr run . {CONNECTION_NAME} --stream -c "num-server-rounds=10 output-dir='/srv/medfuse/fed1'"

   Runs and their status:  flwr ls {CONNECTION_NAME}
   Results, checkpoints and the final model are written by the ServerApp under
   output-dir on this machine (results.jsonl, checkpoints/, final/).

5. After a SuperLink restart (same --database) the running run is marked failed.
   Continue it from its last checkpoint: the same command plus resume=true:

  flwr run . {CONNECTION_NAME} --stream \\
      -c "num-server-rounds=10 output-dir='/srv/medfuse/fed1' resume=true"

See docs/deployment.md in the medfuse repository for the whole procedure.
"""


def _hospital_readme(name: str, hosts: Sequence[str], port: int, epsilon_budget: float) -> str:
    address = _superlink_address(hosts, port)
    node_cfg = node_config_string("$DATA_PATH", name, "auto", epsilon_budget, "$STATE_DIR")
    # double-quoted for the shell so that $DATA_PATH and $STATE_DIR expand
    shell_cfg = '"' + node_cfg.replace('"', '\\"') + '"'
    title = f'medfuse hospital "{name}": what this folder is for'
    return f"""{title}
{'=' * len(title)}

Files: ca.crt (verifies the coordinator's SuperLink), supernode.key (YOUR private key:
readable by you only, never send it anywhere), supernode.pub (your public key; the
coordinator already has a copy and registers it). No other participant's private key
is in this folder.

1. Check your data first (a site folder in medfuse dataset format v1):

  medfuse data check /path/to/your/site

2. Start the SuperNode from this folder (only outgoing TCP to {address} is needed;
   the --port below is local to this machine, for the ClientApp processes):

  DATA_PATH=/path/to/your/site
  STATE_DIR=$HOME/.medfuse/state/{name}
  {env_prefix()} flower-supernode \\
      --superlink {address} \\
      --root-certificates ca.crt \\
      --auth-supernode-private-key supernode.key \\
      --node-config {shell_cfg} \\
      --port 9094

   data-path: your site folder. device: auto, cpu, cuda or cuda:N.
   epsilon-budget: your privacy budget for everything ever trained on this data (it
   may be lower than the federation's, never higher). state-dir: where your privacy
   ledger lives; keep it across restarts, it is what stops the budget from resetting.

Nothing leaves this machine but model weight updates and scalar metrics.
"""


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
    subject_alt_names(hosts)  # validates before anything is written
    if not 1 <= superlink_port <= 65535:
        raise ProvisionError(f"--superlink-port {superlink_port} is not a TCP port")
    if not epsilon_budget > 0:
        raise ProvisionError(f"--epsilon-budget must be > 0, got {epsilon_budget}")
    out = Path(out).resolve()
    ca_dir, coord = out / CA_DIR, out / COORDINATOR_DIR
    hosp = {n: out / HOSPITALS_DIR / n for n in names}
    _refuse_or_clear(out, coord, hosp, force)

    ca_key, ca_cert = make_ca(days=ca_days)
    sl_key, sl_cert = make_server_cert(ca_key, ca_cert, hosts, days=cert_days)
    ca_pem = _pem_cert(ca_cert)
    files = [
        _write(ca_dir / CA_KEY, _pem_key(ca_key), private=True),
        _write(ca_dir / CA_CERT, ca_pem),
        _write(coord / CA_CERT, ca_pem),
        _write(coord / SUPERLINK_CERT, _pem_cert(sl_cert)),
        _write(coord / SUPERLINK_KEY, _pem_key(sl_key), private=True),
    ]
    for name, folder in hosp.items():
        files += _hospital_files(name, folder, coord, ca_pem, hosts, superlink_port,
                                 epsilon_budget)
    regs = "".join(register_command(f"{PUBKEYS_DIR}/{n}.pub", n) + "\n" for n in names)
    files.append(_write(coord / REGISTER_TXT, "# run from this folder, with the SuperLink up "
                        f"and a [superlink.{CONNECTION_NAME}] entry in $FLWR_HOME/config.toml\n"
                        + regs))
    files.append(
        _write(coord / README, _coordinator_readme(names, hosts, superlink_port, bind_host))
    )
    manifest = {
        "hospitals": list(names),
        "superlink-hosts": list(hosts),
        "superlink-port": superlink_port,
        "connection": CONNECTION_NAME,
        "created": _now().isoformat(timespec="seconds"),
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
        _write(folder / README, _hospital_readme(name, hosts, port, epsilon_budget)),
        _write(coord / PUBKEYS_DIR / f"{name}.pub", public),
    ]
