"""Policy builder and policy file validation; the embedded Intel root and its pin."""

from __future__ import annotations

import hashlib

import pytest

from eemini.tdx import roots
from eemini.tdx.collateral import TcbStatus
from eemini.tdx.errors import CertificateParseError, PolicyError
from eemini.tdx.policy import DEFAULT_POLICY, Policy, PolicyBuilder, policy_from_json


def test_defaults_are_the_safe_ones() -> None:
    assert Policy() == DEFAULT_POLICY
    assert DEFAULT_POLICY.allow_debug is False
    assert DEFAULT_POLICY.accepted_tcb_statuses == frozenset({TcbStatus.UP_TO_DATE})
    assert DEFAULT_POLICY.require_collateral is True
    assert DEFAULT_POLICY.require_sept_ve_disable is True
    assert DEFAULT_POLICY.require_zero_mr_servicetd is True


def test_builder_is_immutable_and_sets_once() -> None:
    base = PolicyBuilder()
    with_debug = base.allow_debug()
    assert base.build().allow_debug is False
    assert with_debug.build().allow_debug is True
    with pytest.raises(PolicyError, match=r"^allow_debug may only be set once$"):
        with_debug.allow_debug(False)
    with pytest.raises(PolicyError, match=r"^rtmr2 may only be set once$"):
        base.rtmr(2, "00" * 48).rtmr(2, "11" * 48)


def test_builder_validates_values() -> None:
    b = PolicyBuilder()
    assert b.report_data("abcd").build().report_data == bytes.fromhex("abcd") + bytes(62)
    with pytest.raises(PolicyError, match=r"^report_data must be 64 bytes, got 65$"):
        b.report_data("00" * 65)
    with pytest.raises(PolicyError, match=r"^report_data is not valid hex: 'xyz'$"):
        b.report_data("xyz")
    with pytest.raises(PolicyError, match=r"^mr_td must be 48 bytes, got 47$"):
        b.accepted_mr_td(["00" * 47])
    with pytest.raises(PolicyError, match=r"^RTMR index must be 0\.\.3, got 4$"):
        b.rtmr(4, "00" * 48)
    with pytest.raises(PolicyError, match=r"^a Revoked TCB can never be accepted$"):
        b.accepted_tcb_statuses(["Revoked"])
    with pytest.raises(PolicyError, match=r"^unknown TCB status 'Fine' \(known: UpToDate, "):
        b.accepted_tcb_statuses(["Fine"])
    rtmrs = b.rtmr(1, "11" * 48).build().rtmrs
    assert rtmrs == (None, b"\x11" * 48, None, None)


def test_policy_file() -> None:
    p = policy_from_json(
        '{"mr_td": ["' + "ab" * 48 + '"], "allow_debug": true, "accepted_tcb_statuses": '
        '["UpToDate", "SWHardeningNeeded"], "require_sept_ve_disable": false, "rtmr3": "'
        + "cd" * 48
        + '"}'
    )
    assert p.accepted_mr_td == frozenset({b"\xab" * 48})
    assert p.allow_debug and not p.require_sept_ve_disable
    assert p.accepted_tcb_statuses == frozenset({TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED})
    assert p.rtmrs[3] == b"\xcd" * 48
    with pytest.raises(PolicyError, match=r"^unknown policy key 'debug' \(known: report_data, "):
        policy_from_json('{"debug": true}')
    with pytest.raises(PolicyError, match=r"^allow_debug must be true or false, got 'yes'$"):
        policy_from_json('{"allow_debug": "yes"}')
    with pytest.raises(PolicyError, match=r"^policy is not JSON"):
        policy_from_json("allow_debug = true")
    with pytest.raises(PolicyError, match=r"^policy must be a JSON object$"):
        policy_from_json("[]")
    # The same key twice: refused, not "the last one wins" (parsers disagree on which does).
    with pytest.raises(PolicyError, match=r"^policy key 'allow_debug' appears twice$"):
        policy_from_json('{"allow_debug": false, "allow_debug": true}')
    with pytest.raises(PolicyError, match=r"^policy is not JSON: maximum recursion depth exceeded"):
        policy_from_json("[" * 100_000 + "]" * 100_000)
    p = policy_from_json('{"allow_any_firmware": true, "allow_unbound_runtime_log": true}')
    assert (p.allow_any_firmware, p.allow_unbound_runtime_log) == (True, True)
    assert (Policy().allow_any_firmware, Policy().allow_unbound_runtime_log) == (False, False)


def test_intel_root_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    der = roots.INTEL_ROOT.der
    assert hashlib.sha256(der).hexdigest() == roots.INTEL_SGX_ROOT_CA_SHA256
    assert roots.INTEL_ROOT.certificate.subject.rfc4514_string() == (
        "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX Root CA"
    )
    monkeypatch.setattr(roots, "INTEL_SGX_ROOT_CA_SHA256", "00" * 32)
    with pytest.raises(AssertionError, match=r"^embedded Intel SGX Root CA has fingerprint 44a0196b"):
        roots.intel_root()


def test_development_root_must_be_pem() -> None:
    with pytest.raises(CertificateParseError, match=r"^development root is not a PEM certificate"):
        roots.development_root(b"not a certificate")
