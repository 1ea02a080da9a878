"""The policy's max_collateral_age, on real and development collateral, and what an OutOfDate TCB
says about how far behind the platform is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, shared_testdata
from eemini.tdx import errors
from eemini.tdx.collateral import TcbStatus, parse_collateral
from eemini.tdx.describe import verified_to_dict
from eemini.tdx.errors import PolicyError
from eemini.tdx.pcs import CollateralFetcher, HttpsClient, Source
from eemini.tdx.policy import PolicyBuilder, policy_from_json
from eemini.tdx.quote import parse_quote
from eemini.tdx.roots import development_root
from eemini.tdx.verify import verify
from fake_pcs import PCK_CRL_PATH, QE_PATH, ROOT_CRL_PATH, TCB_PATH, FakePcs, TlsFiles
from tdx_builder import NOW, TCB_SIGNING_KEY, build_quote, make_chain, make_collateral, raw_sign

COS = "go-tdx-guest__cos-113-tdx-quote"  # TCB info 30 days old at verify_at, QE identity 21, PCK CRL 14
COS_AT = 1763488129
ANY = [s.value for s in TcbStatus if s != TcbStatus.REVOKED]


def _cos() -> tuple[bytes, str]:
    d = shared_testdata("quotes")
    return (d / f"{COS}.bin").read_bytes(), (d / f"{COS}.collateral.json").read_text()


@pytest.mark.parametrize(
    ("value", "seconds"), [(3600, 3600), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)]
)
def test_policy_durations(value: object, seconds: int) -> None:
    assert policy_from_json(json.dumps({"max_collateral_age": value})).max_collateral_age == seconds


@pytest.mark.parametrize(
    "value", [0, -5, True, 1.5, "7w", "d", "7 d", "", "\u0667d", None]
)  # an Arabic-Indic seven
def test_policy_duration_refused(value: object) -> None:
    with pytest.raises(PolicyError) as e:
        policy_from_json(json.dumps({"max_collateral_age": value}))
    assert str(e.value) == (
        'max_collateral_age must be a positive number of seconds, or a string like "7d" (d, h, m or '
        f"s), got {value!r}"
    )


def test_real_collateral_older_than_the_policy_allows() -> None:
    quote, collateral = _cos()
    policy = PolicyBuilder().max_collateral_age("7d").build()
    with pytest.raises(errors.CollateralTooOld) as e:
        verify(quote, parse_collateral(collateral), policy, COS_AT)
    assert e.value.one_line() == (
        "collateral-age: TCB info is from 2025-10-19T17:48:50+00:00 (issueDate), 29d 23h 59m 59s "
        "before 2025-11-18T17:48:49+00:00; the policy accepts at most 7d (max_collateral_age)"
    )
    # 30 days admit all three; the root CA CRL (from 2025-03-20) is never judged by age.
    v = verify(
        quote, parse_collateral(collateral), PolicyBuilder().max_collateral_age("30d").build(), COS_AT
    )
    assert v.checks[4:9] == (
        "crls",
        "tcb-info",
        "qe-identity-collateral",
        "collateral-age",
        "revocation",
    )
    # Without the key, no age check at all.
    v = verify(quote, parse_collateral(collateral), PolicyBuilder().build(), COS_AT)
    assert "collateral-age" not in v.checks


def test_each_item_is_judged_by_its_own_date() -> None:
    chain = make_chain(intermediate=True)
    roots = [development_root(chain.root_pem)]
    quote, collateral = build_quote(chain), parse_collateral(make_collateral(chain))
    any_status = PolicyBuilder().accepted_tcb_statuses(ANY)
    # TCB info and QE identity are from 2024-06-01, both CRLs from 2024-01-01; NOW is 2026-01-01.
    with pytest.raises(errors.CollateralTooOld) as e:
        verify(
            quote, collateral, any_status.max_collateral_age("600d").build(), NOW, trusted_roots=roots
        )
    assert e.value.message == (
        "PCK CRL is from 2024-01-01T00:00:00+00:00 (thisUpdate), 731d before 2026-01-01T00:00:00+00:00; "
        "the policy accepts at most 600d (max_collateral_age)"
    )
    # TCB info re-issued in 2025: now the QE identity is the oldest of the three.
    doc = json.loads(make_collateral(chain))
    doc["tcb_info"] = doc["tcb_info"].replace("2024-06-01T00:00:00Z", "2025-06-01T00:00:00Z")
    doc["tcb_info_signature"] = raw_sign(TCB_SIGNING_KEY, doc["tcb_info"].encode()).hex()
    with pytest.raises(errors.CollateralTooOld) as e:
        verify(quote, parse_collateral(json.dumps(doc)), any_status.max_collateral_age("500d").build(),
               NOW, trusted_roots=roots)  # fmt: skip
    assert e.value.message.startswith("QE identity is from 2024-06-01T00:00:00+00:00 (issueDate), 579d ")
    v = verify(
        quote, collateral, any_status.max_collateral_age("800d").build(), NOW, trusted_roots=roots
    )
    assert "collateral-age" in v.checks


def test_cli_policy_key(tmp_path: Path) -> None:
    d = shared_testdata("quotes")
    policy = tmp_path / "policy.json"
    policy.write_text('{"max_collateral_age": "14d"}')
    proc = subprocess.run(
        [sys.executable, "-m", "eemini", "verify", str(d / f"{COS}.bin"), "--collateral",
         str(d / f"{COS}.collateral.json"), "--at", str(COS_AT), "--policy", str(policy)],
        check=False, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "eemini verify: rejected: collateral-age: TCB info is from 2025-10-19T17:48:50+00:00 "
        "(issueDate), 29d 23h 59m 59s before 2025-11-18T17:48:49+00:00; the policy accepts at most "
        "14d (max_collateral_age)\n"
    )


def test_the_cache_refetches_what_is_too_old_once(tmp_path: Path) -> None:
    quote, collateral = _cos()
    doc = json.loads(collateral)
    tls = TlsFiles.create(tmp_path / "tls")
    with FakePcs(tls, pccs=True) as fake:
        fake.serve(doc)

        def fetcher() -> CollateralFetcher:
            client = HttpsClient(ca_file=str(tls.ca_pem), attempts=1)
            return CollateralFetcher(Source.pccs(fake.url), cache_dir=tmp_path / "cache", client=client)

        fetcher().for_quote(parse_quote(quote), COS_AT)
        assert len(fake.requests) == 4
        # Older than 7 days: TCB info, QE identity and PCK CRL are asked for again (the root CA
        # CRL is not judged by age); the service has nothing younger, so the verifier says so.
        again = fetcher()
        fetched = again.for_quote(parse_quote(quote), COS_AT, max_age=7 * 86400)
        assert fetched.from_cache == (False, False, False, True)
        assert [r.split("?")[0] for r in fake.requests[4:]] == [TCB_PATH, QE_PATH, PCK_CRL_PATH]
        with pytest.raises(errors.CollateralTooOld):
            verify(
                quote, fetched.collateral, PolicyBuilder().max_collateral_age(7 * 86400).build(), COS_AT
            )
        # The same fetcher does not ask again right away for what the service just served.
        again.for_quote(parse_quote(quote), COS_AT, max_age=7 * 86400)
        assert len(fake.requests) == 7
        assert ROOT_CRL_PATH in fake.requests[3]


# How far behind --------------------------------------------------------------------------------


def _named_level(sgx: list[int], pce: int, tdx: list[int], date: str, status: str) -> dict[str, Any]:
    names = [{"category": "BIOS", "type": "Early Microcode Update"}, {"category": "OS/VMM"}]
    return {
        "tcb": {
            "sgxtcbcomponents": [{"svn": s, **(names[i] if i < 2 else {})} for i, s in enumerate(sgx)],
            "pcesvn": pce,
            "tdxtcbcomponents": [
                {"svn": t, **({"category": "OS/VMM", "type": "TDX Module"} if i == 0 else {})}
                for i, t in enumerate(tdx)
            ],
        },
        "tcbDate": date,
        "tcbStatus": status,
    }


def test_out_of_date_says_how_far_behind() -> None:
    chain = make_chain(intermediate=True, components=(2, 1, 3) + (1,) * 13, pce_svn=11)
    roots = [development_root(chain.root_pem)]
    latest = _named_level(
        [3, 2, 3] + [1] * 13, 13, [5, 0, 4] + [0] * 13, "2024-03-13T00:00:00Z", "UpToDate"
    )
    older = _named_level(
        [2, 1, 3] + [1] * 13, 11, [3, 0, 4] + [0] * 13, "2023-02-15T00:00:00Z", "OutOfDate"
    )
    collateral = make_collateral(
        chain, levels=(latest, older), qe_levels=((8, "UpToDate"), (4, "OutOfDate"))
    )
    quote = build_quote(
        chain, tee_tcb_svn=bytes.fromhex("03000400000000000000000000000000"), qe_isv_svn=4
    )
    with pytest.raises(errors.TcbStatusRejected) as e:
        verify(quote, parse_collateral(collateral), PolicyBuilder().build(), NOW, trusted_roots=roots)
    assert e.value.message == (
        "TCB status is OutOfDate (advisories: none); accepted: UpToDate; the platform matches the TCB "
        "level of 2023-02-15T00:00:00Z, the latest is of 2024-03-13T00:00:00Z; below the latest: SGX "
        "component 0 (BIOS, Early Microcode Update) SVN 2 < 3; SGX component 1 (OS/VMM) SVN 1 < 2; "
        "PCE SVN 11 < 13; TDX component 0 (OS/VMM, TDX Module) SVN 3 < 5; QE ISV SVN 4 < 8 (of "
        "2024-03-13T00:00:00Z)"
    )
    accepted = PolicyBuilder().accepted_tcb_statuses(ANY).build()
    v = verify(quote, parse_collateral(collateral), accepted, NOW, trusted_roots=roots)
    assert verified_to_dict(v)["tcb_drift"] == {
        "level_date": "2023-02-15T00:00:00Z",
        "latest_date": "2024-03-13T00:00:00Z",
        "behind": [
            "SGX component 0 (BIOS, Early Microcode Update) SVN 2 < 3",
            "SGX component 1 (OS/VMM) SVN 1 < 2",
            "PCE SVN 11 < 13",
            "TDX component 0 (OS/VMM, TDX Module) SVN 3 < 5",
            "QE ISV SVN 4 < 8 (of 2024-03-13T00:00:00Z)",
        ],
    }
    # An up-to-date platform has no drift to report.
    current = make_chain(intermediate=True, components=(3, 2, 3) + (1,) * 13, pce_svn=13, seed=2)
    collateral = make_collateral(current, levels=(latest, older), qe_levels=((8, "UpToDate"),))
    quote = build_quote(
        current, tee_tcb_svn=bytes.fromhex("05000400000000000000000000000000"), qe_isv_svn=8
    )
    v = verify(quote, parse_collateral(collateral), accepted, NOW,
               trusted_roots=[development_root(current.root_pem)])  # fmt: skip
    assert (v.tcb_status, v.tcb is not None and v.tcb.drift) == ("UpToDate", None)


def test_tdx_module_drift() -> None:
    chain = make_chain(intermediate=True)
    roots = [development_root(chain.root_pem)]
    identity: dict[str, object] = {
        "id": "TDX_01", "mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8,
        "tcbLevels": [
            {"tcb": {"isvsvn": 4}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 2}, "tcbDate": "2023-08-09T00:00:00Z", "tcbStatus": "OutOfDate"},
        ],
    }  # fmt: skip
    quote = build_quote(chain, tee_tcb_svn=bytes.fromhex("02010400000000000000000000000000"))
    accepted = PolicyBuilder().accepted_tcb_statuses(ANY).build()
    collateral = parse_collateral(make_collateral(chain, module_identities=[identity]))
    v = verify(quote, collateral, accepted, NOW, trusted_roots=roots)
    assert v.tcb is not None and v.tcb.drift is not None
    assert v.tcb.drift.behind == ("TDX module TDX_01 SVN 2 < 4 (of 2024-03-13T00:00:00Z)",)
