"""Attacks on a node's own records, run against the product's code: an insider who edits
the privacy ledger or the audit log and recomputes their chains, raises a budget, deletes
the key, or re-encodes the site's images to get a fresh ledger. Each must fail."""

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from client.privacy import (
    INDEX_FILE,
    LEDGER_FILE,
    PIXEL_CACHE_FILE,
    RDP_CACHE_FILE,
    VERIFIED,
    Ledger,
    LedgerEntry,
    LedgerError,
    LedgerStore,
    VerifiedPrefix,
    data_identity,
    history_epsilon,
)
from medfuse import app as medfuse_app
from shared_model import audit_log, chain_key

DELTA = 1e-5


def _site(folder: Path, cases: int = 6) -> Path:
    """Grey 8-bit PNGs of noise (so that encoders really differ) and a manifest."""
    rng = np.random.default_rng(7)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["case_id,image,report,label"]
    for i in range(cases):
        pixels = rng.integers(0, 256, size=(24, 20), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / "img" / f"c{i}.png")
        rows.append(f"c{i},img/c{i}.png,report {i},normal")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def _open(store: LedgerStore, data: Path, budget: float = 8.0, delta: float = DELTA,
          name: str = "site-00") -> Ledger:
    with store.lock():
        return store.open(data_identity(data), site_name=name, data_path=data,
                          epsilon_budget=budget, eval_epsilon_budget=2.0, delta=delta)


def _spend(store: LedgerStore, data: Path, rounds: int = 2, **kw) -> Ledger:
    ledger = _open(store, data, **kw)
    for rnd in range(1, rounds + 1):
        ledger.append("dp-sgd", run_id=1, server_round=rnd, noise_multiplier=1.0,
                      sample_rate=0.05, steps=30)
        store.save(ledger)
    return ledger


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return _site(tmp_path / "site-00")


@pytest.fixture()
def store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "store")


def _forge(store: LedgerStore, key: str, edit) -> None:
    """What an insider does with a text editor and sha256: edit the ledger, recompute every
    entry's epsilon_after and the chain the unkeyed way (genesis = sha256 of the data
    digest, each prev = sha256 of the entry before), any file digest likewise, and the
    store index's head and count."""
    path = store.ledger_path(key)
    data = json.loads(path.read_text())
    edit(data)
    prev = hashlib.sha256(f"medfuse-ledger/{data['data_digest']}".encode()).hexdigest()
    history: dict[str, list] = {"train": [], "evaluation": []}
    for raw in data["entries"]:
        bucket = "train" if raw["kind"] in ("dp-sgd", "count", "non-private") else "evaluation"
        history[bucket].append((raw["noise_multiplier"], raw["sample_rate"], raw["steps"]))
        raw["epsilon_after"] = history_epsilon(history[bucket], data["delta"])
        raw["prev"] = prev
        prev = hashlib.sha256(LedgerEntry.model_validate(raw).model_dump_json().encode()
                              ).hexdigest()
    if "mac" in data:  # the editor's best guess at a file digest they cannot make
        body = {k: v for k, v in data.items() if k != "mac"}
        data["mac"] = hashlib.sha256(json.dumps(body).encode()).hexdigest()
    path.write_text(json.dumps(data, indent=2))
    index_path = store.root / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["ledgers"][key].update(entries=len(data["entries"]), head=prev)
    index_path.write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------- the ledger


def test_an_insider_who_lowers_spent_epsilon_and_recomputes_the_chain_is_refused(
    store: LedgerStore, data_dir: Path
) -> None:
    # Prepare: two rounds spent
    ledger = _spend(store, data_dir)
    spent = ledger.epsilon()

    def more_noise(data: dict) -> None:
        for e in data["entries"]:
            e["noise_multiplier"] = 3.0

    # Execute: noise raised after the fact, epsilon_after, chain and index recomputed
    _forge(store, ledger.key, more_noise)
    forged = json.loads(store.ledger_path(ledger.key).read_text())
    # Assert: the forgery would have lowered the figure, and it is refused
    assert forged["entries"][-1]["epsilon_after"] < spent / 2
    with pytest.raises(LedgerError, match="altered|edited"):
        _open(store, data_dir)
    assert store.ledger_path(ledger.key).read_text() == json.dumps(forged, indent=2)


@pytest.mark.parametrize("field, stored, forged", [
    ("epsilon_budget", 3.0, 8.0),
    ("eval_epsilon_budget", 2.0, 50.0),
    ("delta", 1e-6, 1e-5),
    ("released_count", 40, 4000),
])
def test_a_raised_budget_delta_or_count_in_the_file_is_refused(
    store: LedgerStore, data_dir: Path, field: str, stored: float, forged: float
) -> None:
    # Prepare: a ledger whose budget was lowered (or whose count was released) earlier
    ledger = _spend(store, data_dir, budget=3.0, delta=1e-6)
    if field == "released_count":
        ledger.released_count = int(stored)
        store.save(ledger)
    assert getattr(store.load(ledger.key), field) == stored

    def raise_it(data: dict) -> None:
        data[field] = forged

    # Execute: the field raised in the file, everything recomputable recomputed
    _forge(store, ledger.key, raise_it)
    # Assert: refused, also when a run asks for as much as the forged value
    with pytest.raises(LedgerError, match="edited"):
        _open(store, data_dir, budget=8.0, delta=1e-5)


def test_ledger_index_key_and_cache_are_private(store: LedgerStore, data_dir: Path) -> None:
    ledger = _spend(store, data_dir, rounds=1)
    store.identify(data_dir)
    for path in (store.ledger_path(ledger.key), store.root / INDEX_FILE,
                 store.root / chain_key.KEY_FILE, store.root / PIXEL_CACHE_FILE,
                 store.root / RDP_CACHE_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len((store.root / chain_key.KEY_FILE).read_bytes()) == 32


def test_a_deleted_key_is_refused_never_made_anew(store: LedgerStore, data_dir: Path) -> None:
    # Prepare: privacy spent, then the key deleted
    ledger = _spend(store, data_dir, rounds=1)
    key_file = store.root / chain_key.KEY_FILE
    key_file.unlink()
    # Execute / Assert: the store and the audit log beside it both refuse, naming the key
    with pytest.raises(LedgerError, match=r"chain\.key is missing.*restore"):
        _open(LedgerStore(store.root), data_dir)
    with pytest.raises(LedgerError, match=r"chain\.key is missing"):
        LedgerStore(store.root).identify(data_dir)
    with pytest.raises(audit_log.AuditLogError, match=r"chain\.key is missing"):
        audit_log.append(store.root / audit_log.LOG_FILE, {"what": "train"})
    assert not key_file.exists()  # nothing was silently recreated
    assert store.ledger_path(ledger.key).exists()


def test_a_deleted_index_is_refused_not_a_fresh_store(store: LedgerStore,
                                                      data_dir: Path) -> None:
    ledger = _spend(store, data_dir, rounds=1)
    before = store.ledger_path(ledger.key).read_text()
    (store.root / INDEX_FILE).unlink()
    with pytest.raises(LedgerError, match="index .* is missing"):
        _open(store, data_dir)
    assert store.ledger_path(ledger.key).read_text() == before  # not written over


def test_an_index_entry_removed_by_hand_is_refused(store: LedgerStore,
                                                   data_dir: Path) -> None:
    ledger = _spend(store, data_dir, rounds=1)
    index_path = store.root / INDEX_FILE
    index = json.loads(index_path.read_text())
    del index["ledgers"][ledger.key]
    index_path.write_text(json.dumps(index))
    with pytest.raises(LedgerError, match="index .* was edited"):
        _open(store, data_dir)


def test_an_earlier_ledger_version_is_a_clear_message(store: LedgerStore,
                                                      data_dir: Path) -> None:
    ledger = _spend(store, data_dir, rounds=1)
    path = store.ledger_path(ledger.key)
    data = json.loads(path.read_text())
    data["version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="version 2 privacy ledger.*no migration"):
        _open(store, data_dir)
    index_path = store.root / INDEX_FILE
    index_path.write_text(json.dumps({"version": 1, "ledgers": {}}))
    with pytest.raises(LedgerError, match="version 1 ledger store index.*no migration"):
        _open(store, data_dir)


def _ec_key(path: Path, fmt: str) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    encoding, form = {
        "openssh": (serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH),
        "pem": (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
    }[fmt]
    path.write_bytes(key.private_bytes(encoding, form, serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("fmt", ["openssh", "pem"])
def test_a_key_derived_from_the_supernode_key_stays_out_of_the_store(
    tmp_path: Path, data_dir: Path, fmt: str
) -> None:
    # Prepare: the SuperNode's private key (Flower's are EC keys in OpenSSH form)
    node_key = _ec_key(tmp_path / "node.key", fmt)
    derived = chain_key.key_from_node_key(node_key)
    store = LedgerStore(tmp_path / "store", key=derived)
    # Execute
    ledger = _spend(store, data_dir, rounds=1)
    # Assert: stable, 32 bytes, no key file in the store, and another key is refused
    assert derived == chain_key.key_from_node_key(node_key) and len(derived) == 32
    assert derived != chain_key.key_from_node_key(_ec_key(tmp_path / "other.key", fmt))
    assert not (store.root / chain_key.KEY_FILE).exists()
    assert LedgerStore(store.root, key=derived).load(ledger.key).epsilon() == ledger.epsilon()
    with pytest.raises(LedgerError, match="another chain key"):
        LedgerStore(store.root, key=os.urandom(32)).load(ledger.key)


# ----------------------------------------------------------------- re-encoded images


def _reencode(site: Path, how: str) -> None:
    """Every image of the site written again, losslessly, another way."""
    manifest = site / "manifest.csv"
    for png in sorted((site / "img").glob("*.png")):
        pixels = np.asarray(Image.open(png))
        if how == "compress-0":
            Image.fromarray(pixels).save(png, compress_level=0)
        elif how == "optimize":
            Image.fromarray(pixels).save(png, optimize=True)
        elif how == "chunks":
            info = PngInfo()
            info.add_text("Software", "another encoder")
            Image.fromarray(pixels).save(png, pnginfo=info, compress_level=9, dpi=(300, 300))
        elif how == "16-bit":
            Image.fromarray(pixels.astype(np.uint16) * 257).save(png)  # same intensities
        elif how == "rgb":
            Image.fromarray(pixels).convert("RGB").save(png)
        elif how == "dicom":
            _write_dicom8(png.with_suffix(".dcm"), pixels)
            png.unlink()
    if how == "dicom":
        manifest.write_text(manifest.read_text().replace(".png", ".dcm"))


def _write_dicom8(path: Path, pixels: np.ndarray) -> None:
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    dcmwrite(path, ds, enforce_file_format=True)


@pytest.mark.parametrize("how", ["compress-0", "optimize", "chunks", "16-bit", "rgb",
                                 "dicom"])
def test_re_encoding_every_image_finds_the_same_ledger(
    store: LedgerStore, data_dir: Path, how: str
) -> None:
    # Prepare: privacy spent on the site as it is
    ledger = _spend(store, data_dir)
    spent = ledger.epsilon()
    before = {p.name: p.read_bytes() for p in (data_dir / "img").iterdir()}
    # Execute: every image re-encoded without loss
    _reencode(data_dir, how)
    after = {p.name: p.read_bytes() for p in (data_dir / "img").iterdir()}
    # Assert: other bytes, the same ledger and spent epsilon (with and without the cache)
    assert not set(before.values()) & set(after.values())
    again = _open(store, data_dir)
    assert again.key == ledger.key and again.epsilon() == spent
    assert store.identify(data_dir) == data_identity(data_dir)
    assert store.keys() == [ledger.key]


def test_what_re_encoding_does_not_survive_is_a_new_ledger(data_dir: Path) -> None:
    before = data_identity(data_dir)
    png = data_dir / "img" / "c0.png"
    Image.open(png).resize((12, 10)).save(png)  # resized: other content
    after = data_identity(data_dir)
    assert after.digest != before.digest
    assert len(set(after.records) & set(before.records)) == 5  # the store finds the overlap


def test_the_cache_spares_decoding_and_an_edited_cache_is_ignored(
    store: LedgerStore, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.privacy as privacy

    # Prepare: the store has seen the site once
    first = store.identify(data_dir)

    def no_decoding(path: Path, raw: bytes | None = None) -> str:
        raise AssertionError(f"{path} decoded again")

    # Execute / Assert: a second look only hashes bytes
    monkeypatch.setattr(privacy, "record_digest", no_decoding)
    assert LedgerStore(store.root).identify(data_dir) == first
    monkeypatch.undo()
    # an insider who maps the site's files to other records (a fresh ledger) is ignored
    cache_file = store.root / PIXEL_CACHE_FILE
    data = json.loads(cache_file.read_text())
    data["records"] = {k: "0" * 16 for k in data["records"]}
    cache_file.write_text(json.dumps(data))
    assert LedgerStore(store.root).identify(data_dir) == first


# ----------------------------------------------------------------- the verified prefix


def _forge_keyed(store: LedgerStore, key: str, edit) -> None:
    """The strongest editor there is: one who holds the chain key. Edit the ledger's
    entries and re-MAC everything (each link, the file, the index) without recomputing
    any epsilon_after: only the epsilon recompute can tell."""
    ledger = store.load(key)
    prev, entries = ledger.genesis(), []
    for raw in [e.model_dump() for e in ledger.entries]:
        edit(raw)
        entry = LedgerEntry.model_validate({**raw, "prev": prev})
        entries.append(entry)
        prev = entry.mac(store.mac_key())
    ledger.entries = entries
    store.save(ledger)


def _counting_recomputes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import client.privacy as privacy

    calls: list[int] = []
    real = privacy.history_epsilon

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(privacy, "history_epsilon", counted)
    return calls


def test_a_reread_ledger_recomputes_only_its_new_entries(
    store: LedgerStore, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two rounds spent; this process has read the ledger once
    VERIFIED.forget()
    ledger = _spend(store, data_dir, rounds=2)
    LedgerStore(store.root).load(ledger.key)
    ledger.append("dp-sgd", run_id=1, server_round=3, noise_multiplier=1.0,
                  sample_rate=0.05, steps=30)
    store.save(ledger)
    calls = _counting_recomputes(monkeypatch)
    # Execute: read again, as the next message does
    again = LedgerStore(store.root).load(ledger.key)
    # Assert: the third entry's epsilon recomputed, not the two checked before
    assert len(calls) == 1 and len(again.entries) == 3
    VERIFIED.forget()  # a fresh process recomputes them all
    calls.clear()
    LedgerStore(store.root).load(ledger.key)
    assert len(calls) == 3


def test_an_entry_edited_under_the_key_after_a_read_is_refused(
    store: LedgerStore, data_dir: Path
) -> None:
    # Prepare: the process read and checked the ledger (its prefix remembered)
    ledger = _spend(store, data_dir, rounds=3)
    spent = LedgerStore(store.root).load(ledger.key).epsilon()
    assert VERIFIED.get(store.ledger_path(ledger.key)) is not None

    def fewer_steps(raw: dict) -> None:  # the first round "took" 1 step, not 30
        if raw["server_round"] == 1:
            raw["steps"] = 1

    # Execute: an editor with the key rewrites round 1 and re-MACs file and index
    _forge_keyed(store, ledger.key, fewer_steps)
    # Assert: the edit lowered the figure, and the next read refuses it (the remembered
    # prefix no longer matches the chain, so every epsilon is recomputed)
    forged = Ledger.model_validate_json(store.ledger_path(ledger.key).read_text())
    forged._key = store.mac_key()
    assert forged.epsilon() < spent
    with pytest.raises(LedgerError, match="cannot be trusted.*was edited"):
        LedgerStore(store.root).load(ledger.key)


def test_an_edited_or_cut_ledger_is_refused_after_a_read(
    store: LedgerStore, data_dir: Path
) -> None:
    # Prepare: read and checked once (prefix remembered), then edited the unkeyed way
    ledger = _spend(store, data_dir, rounds=3)
    LedgerStore(store.root).load(ledger.key)

    def cut(data: dict) -> None:
        data["entries"] = data["entries"][:-1]

    def more_noise(data: dict) -> None:
        data["entries"][0]["noise_multiplier"] = 3.0

    for edit in (cut, more_noise):
        path = store.ledger_path(ledger.key)
        before = path.read_text()
        # Execute
        _forge(store, ledger.key, edit)
        # Assert
        with pytest.raises(LedgerError):
            LedgerStore(store.root).load(ledger.key)
        path.write_text(before)


def test_a_prefix_fits_only_the_same_entries_at_the_same_delta() -> None:
    known = VerifiedPrefix(delta=1e-5, entries=2, head="b" * 64)
    assert known.fits(1e-5, ["a" * 64, "b" * 64, "c" * 64])
    assert not known.fits(1e-6, ["a" * 64, "b" * 64])  # another delta: other epsilons
    assert not known.fits(1e-5, ["a" * 64, "c" * 64])  # an earlier entry changed
    assert not known.fits(1e-5, ["b" * 64])  # shorter: cut
    assert not VerifiedPrefix(1e-5, 0, "").fits(1e-5, [])


def test_a_fresh_process_reads_the_stores_rdps_and_an_edited_file_is_not_used(
    store: LedgerStore, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.privacy as privacy

    # Prepare: two rounds spent (their RDP kept beside the ledgers), then a process that
    # has computed nothing and verified nothing
    ledger = _spend(store, data_dir, rounds=2)
    spent = ledger.epsilon()
    assert (store.root / RDP_CACHE_FILE).is_file()
    VERIFIED.forget()

    def no_rdp(noise: float, rate: float):  # type: ignore[no-untyped-def]
        raise AssertionError(f"RDP of ({noise}, {rate}) computed again")

    monkeypatch.setattr(privacy, "_step_rdp", no_rdp)
    # Execute / Assert: the ledger verifies (every epsilon recomputed) from the file
    assert LedgerStore(store.root).load(ledger.key).epsilon() == spent
    # an editor who makes the noise cost nothing: the file is not used, RDP is computed
    path = store.root / RDP_CACHE_FILE
    data = json.loads(path.read_text())
    data["steps"] = {k: [0.0] * len(v) for k, v in data["steps"].items()}
    path.write_text(json.dumps(data))
    VERIFIED.forget()
    with pytest.raises(AssertionError, match="computed again"):
        LedgerStore(store.root).load(ledger.key)
    monkeypatch.undo()
    assert LedgerStore(store.root).load(ledger.key).epsilon() == spent


# ----------------------------------------------------------------- the audit log


def _forge_log(log_file: Path) -> None:
    """Edit the first entry's metrics and recompute every digest, link and the head the
    unkeyed way (sha256 of the entry without its digest field)."""
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    entries[0]["metrics"] = {"accuracy": 0.5}
    prev = "0" * 64
    for e in entries:
        field = "mac" if "mac" in e else "digest"
        e["prev"] = prev
        body = {k: v for k, v in e.items() if k != field}
        e[field] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        prev = e[field]
    log_file.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    head_path = log_file.with_name(log_file.name + ".head")
    head = json.loads(head_path.read_text())
    head.update(entries=len(entries), head=prev)
    if "mac" in head:
        head["mac"] = hashlib.sha256(f"{len(entries)}{prev}".encode()).hexdigest()
    head_path.write_text(json.dumps(head))


def test_an_audit_log_rewritten_with_its_chain_recomputed_is_refused(tmp_path: Path) -> None:
    # Prepare: a node's log with two messages
    log_file = tmp_path / "state" / audit_log.LOG_FILE
    for what in ("train run 1", "evaluate run 1"):
        audit_log.append(log_file, {"what": what, "metrics": {"accuracy": 0.9}})
    assert len(audit_log.verify(log_file)) == 2
    # Execute: the insider's edit, chain and head recomputed
    _forge_log(log_file)
    # Assert
    with pytest.raises(audit_log.AuditLogError, match="changed"):
        audit_log.verify(log_file)
    refused = CliRunner().invoke(medfuse_app, ["audit-log", "verify", str(log_file.parent)])
    assert refused.exit_code == 1 and "changed" in refused.stderr


def test_entries_appended_together_are_as_if_appended_one_by_one(tmp_path: Path) -> None:
    # Prepare: the same entries, one log written one by one, the other in one batch
    key = bytes(range(32))
    entries = [{"what": f"train round {i}", "who": f"site-0{i}"} for i in range(3)]
    one, batch = tmp_path / "one" / audit_log.LOG_FILE, tmp_path / "batch" / audit_log.LOG_FILE
    for entry in entries:
        audit_log.append(one, entry, key=key)
    # Execute
    written = audit_log.append_many(batch, entries, key=key)
    # Assert: the same lines and head, and the batch's own entries cut off are refused
    head = audit_log.LOG_FILE + ".head"
    assert batch.read_text() == one.read_text()
    assert (batch.parent / head).read_text() == (one.parent / head).read_text()
    assert [e["seq"] for e in audit_log.verify(batch, key=key)] == [1, 2, 3]
    assert written == audit_log.read(batch) and audit_log.append_many(batch, [], key=key) == []
    batch.write_text("".join(batch.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(audit_log.AuditLogError, match="truncated"):
        audit_log.verify(batch, key=key)


def test_the_audit_log_and_its_head_are_private(tmp_path: Path) -> None:
    log_file = tmp_path / "state" / audit_log.LOG_FILE
    audit_log.append(log_file, {"what": "train run 1"})
    for path in (log_file, log_file.with_name(log_file.name + ".head"),
                 log_file.parent / chain_key.KEY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_audit_log_needs_the_key_it_was_written_with(tmp_path: Path) -> None:
    log_file = tmp_path / "state" / audit_log.LOG_FILE
    audit_log.append(log_file, {"what": "train run 1"})
    with pytest.raises(audit_log.AuditLogError, match="another chain key"):
        audit_log.verify(log_file, key=os.urandom(32))
    (log_file.parent / chain_key.KEY_FILE).unlink()
    with pytest.raises(audit_log.AuditLogError, match=r"chain\.key is missing"):
        audit_log.verify(log_file)
    assert not (log_file.parent / chain_key.KEY_FILE).exists()


@pytest.mark.parametrize("command", ["verify", "show"])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_audit_log_commands_on_a_folder_without_a_log_fail_in_one_line(
    tmp_path: Path, command: str, where: str
) -> None:
    folder = tmp_path / "state"
    if where == "empty":
        folder.mkdir()
    result = CliRunner().invoke(medfuse_app, ["audit-log", command, str(folder)])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and str(folder) in lines[0]
    assert "every" not in result.stdout  # nothing claims to have been verified


def test_audit_log_cli_verifies_with_a_derived_node_key(tmp_path: Path) -> None:
    node_key = _ec_key(tmp_path / "node.key", "openssh")
    log_file = tmp_path / "state" / audit_log.LOG_FILE
    audit_log.append(log_file, {"what": "train run 1"},
                     key=chain_key.key_from_node_key(node_key))
    checked = CliRunner().invoke(medfuse_app, ["audit-log", "verify", str(log_file.parent),
                                               "--node-key", str(node_key)])
    assert checked.exit_code == 0 and "1 entries" in checked.stdout
    without = CliRunner().invoke(medfuse_app, ["audit-log", "verify", str(log_file.parent)])
    assert without.exit_code == 1


def test_every_keyed_file_is_guarded_by_the_key() -> None:
    # a missing key is refused while any of these exists: the table must name them all
    import fnmatch

    for name in (INDEX_FILE, f"0123456789abcdef/{LEDGER_FILE}", audit_log.LOG_FILE,
                 audit_log.LOG_FILE + ".head"):
        assert any(fnmatch.fnmatch(name, p) for p in chain_key.KEYED_FILES), name


def test_audit_log_show_fits_80_columns_in_a_few_lines_an_entry(tmp_path: Path) -> None:
    log_file = tmp_path / "state" / audit_log.LOG_FILE
    metrics = {f"metric-number-{i}": 0.123456 * i for i in range(9)}  # as many as a reply
    for i in range(5):
        audit_log.append(log_file, {"what": f"train run {10**19 + i}", "who": "site-00",
                                    "metrics": metrics,
                                    "arrays": {"count": 69, "bytes": 3_760_000,
                                               "sha256": "ab" * 32}})
    shown = CliRunner().invoke(medfuse_app, ["audit-log", "show", str(log_file.parent)],
                               env={"COLUMNS": "80"})
    lines = shown.output.splitlines()
    assert shown.exit_code == 0, shown.output
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert len(lines) <= 2 + 5 * 6  # a title (its path wraps), then at most 6 lines an entry
    assert sum(line.startswith("#") for line in lines) == 5
    assert "metric-number-8=0.9876" in shown.output
