"""Provisioning: who gets which key, in which format, with which names; no Flower process."""

import ipaddress
import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.ops.handouts import node_config_string
from server.ops.processes import OFFLINE_ENV
from server.ops.provision import ProvisionError, parse_hospitals, provision

HOSPITALS = ("st-marys", "charite", "karolinska")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prov")
    return provision(out, ",".join(HOSPITALS), ["coord.example.org", "10.1.2.3"], 9443)


def _private_keys(folder: Path) -> list[Path]:
    """Every file under `folder` that holds private key material."""
    found = []
    for p in folder.rglob("*"):
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes():
            found.append(p)
    return found


def test_hospital_folder_holds_only_its_own_private_key(fed):
    # Prepare
    ca_key = (fed.ca_dir / "ca.key").read_bytes()
    others = {h: fed.private_key(h).read_bytes() for h in HOSPITALS}
    # Execute / Assert
    for name, folder in fed.hospital_dirs.items():
        keys = _private_keys(folder)
        assert keys == [folder / "supernode.key"], keys
        contents = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
        assert ca_key not in contents
        for other, key in others.items():
            if other != name:
                assert key not in contents
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.txt", "ca.crt", "supernode.key", "supernode.pub"
        ]


def test_coordinator_gets_public_keys_and_its_tls_key_but_no_node_or_ca_key(fed):
    keys = _private_keys(fed.coordinator_dir)
    assert keys == [fed.superlink_key]
    for h in HOSPITALS:
        own = fed.hospital_dirs[h] / "supernode.pub"
        assert fed.public_key(h).read_bytes() == own.read_bytes()


def test_private_keys_are_owner_only(fed):
    for p in _private_keys(fed.out):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(fed.ca_cert.stat().st_mode) == 0o644


def test_superlink_certificate_sans_and_chain(fed):
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(fed.superlink_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")
    }
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key(fed.superlink_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_node_keys_load_the_way_flower_loads_them(fed):
    # Flower 1.42: flower-supernode loads --auth-supernode-private-key with
    # load_ssh_private_key and wants an EC key; `flwr supernode register` loads the
    # public key with load_ssh_public_key and wants a NIST curve.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    for h in HOSPITALS:
        private = serialization.load_ssh_private_key(fed.private_key(h).read_bytes(), None)
        public = serialization.load_ssh_public_key(fed.public_key(h).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert uses_nist_ec_curve(public)
        assert try_load_public_key(fed.public_key(h))  # what `flwr supernode register` sends


def test_register_commands_and_readmes_are_exact(fed):
    text = (fed.coordinator_dir / "register-supernodes.txt").read_text()
    for h in HOSPITALS:
        assert f"flwr supernode register supernode-keys/{h}.pub medfuse --name {h}" in text
        readme = (fed.hospital_dirs[h] / "README.txt").read_text()
        assert "--superlink coord.example.org:9443" in readme
        assert "--root-certificates ca.crt" in readme
        assert "--auth-supernode-private-key supernode.key" in readme
        assert f'site-name=\\"{h}\\"' in readme
        for k, v in OFFLINE_ENV.items():
            assert f"{k}={v}" in readme
    coord = (fed.coordinator_dir / "README.txt").read_text()
    assert "--enable-supernode-auth" in coord and "--database" in coord
    assert "--disable-runtime-dependency-installation" in coord


def test_coordinator_readme_writes_its_own_flower_home_with_the_absolute_ca_path(tmp_path):
    # Prepare: a provisioned coordinator folder and its README's step 2, as pasted
    p = provision(tmp_path / "fed", "st-marys,charite", ["coord.example.org"], 9443)
    readme = (p.coordinator_dir / "README.txt").read_text()
    lines = readme.splitlines()
    start = lines.index("export FLWR_HOME=$PWD/flwr-home")
    block = "\n".join(lines[start:lines.index("EOF", start) + 1]) + "\n"
    # Execute: the lines in a shell started in that folder
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    subprocess.run(["bash", "-c", block + 'echo "$FLWR_HOME"'], cwd=p.coordinator_dir,
                   env=env, check=True, capture_output=True)
    # Assert: not ~/.flwr (docs/deployment.md), no placeholder, the real absolute CA path
    assert "~/.flwr/config.toml" not in readme and "/ABSOLUTE/PATH" not in readme
    config = tomllib.loads((p.coordinator_dir / "flwr-home" / "config.toml").read_text())
    entry = config["superlink"]["medfuse"]
    assert config["superlink"]["default"] == "medfuse"
    assert entry["address"] == "coord.example.org:9443"
    ca = Path(entry["root-certificates"])
    assert ca.is_absolute() and ca.samefile(p.coordinator_dir / "ca.crt")
    assert not (tmp_path / "home" / ".flwr").exists()


def test_hospital_readme_shows_the_ledger_where_the_node_keeps_it(fed):
    # Prepare / Execute
    readme = (fed.hospital_dirs["charite"] / "README.txt").read_text()
    # Assert: `privacy show` reads the same state-dir the SuperNode writes its ledger to
    state = re.search(r"^\s*STATE_DIR=(\S+)$", readme, re.MULTILINE)
    show = re.search(r"^\s*medfuse privacy show --state-dir (\S+)$", readme, re.MULTILINE)
    assert state and show and state.group(1) == show.group(1) == "$HOME/.medfuse/state/charite"
    assert 'state-dir=\\"$STATE_DIR\\"' in readme


def test_second_run_refuses_then_force_replaces(tmp_path):
    # Prepare
    first = provision(tmp_path, "a,b")
    key_a = first.private_key("a").read_bytes()
    # Execute / Assert
    with pytest.raises(ProvisionError, match="refusing to overwrite"):
        provision(tmp_path, "a,b")
    with pytest.raises(ProvisionError, match="refusing to overwrite"):
        provision(tmp_path, "c")  # other names: the CA and SuperLink keys are still there
    assert first.private_key("a").read_bytes() == key_a
    second = provision(tmp_path, "a,c", force=True)
    assert second.private_key("a").read_bytes() != key_a
    assert not (tmp_path / "hospitals" / "b").exists()
    assert not (tmp_path / "coordinator" / "supernode-keys" / "b.pub").exists()


@pytest.mark.parametrize(
    "bad", ["", "a,a", "../evil", "a b", "x" * 40, ",,"]
)
def test_bad_hospital_names_are_refused(bad):
    with pytest.raises(ProvisionError):
        parse_hospitals(bad)


def test_bad_host_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ProvisionError, match="host"):
        provision(tmp_path / "p", "a", ["bad host!"])
    assert not (tmp_path / "p").exists()


def test_node_config_string_parses_as_flower_does():
    from flwr.common.config import parse_config_args

    # Prepare
    text = node_config_string("/data/with space/x", "st-marys", "cuda:1", 3.5, 'C:\\s "q"')
    # Execute
    parsed = parse_config_args([text])
    # Assert
    assert parsed == {
        "data-path": "/data/with space/x",
        "site-name": "st-marys",
        "device": "cuda:1",
        "epsilon-budget": 3.5,
        "state-dir": 'C:\\s "q"',
    }
    with pytest.raises(ValueError):
        node_config_string("""it's "here\"""", "a")
