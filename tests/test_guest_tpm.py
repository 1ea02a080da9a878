"""The guest's TPM 2.0 client (eemini.guest.tpm) against a real TPM: swtpm, provisioned like Azure's
vTPM by tpm2-tools (tests/swtpm.py), and against canned answers for the error paths."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from eemini.guest import tpm as gtpm
from eemini.guest.tpm import Tpm, TpmError, rc_name
from swtpm import AK_HANDLE, HCL_INDEX, USER_DATA_INDEX, Swtpm, running_swtpm


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    with running_swtpm(tmp_path_factory.mktemp("swtpm")) as t:
        yield t


@pytest.fixture
def client(swtpm: Swtpm) -> Iterator[Tpm]:
    """Our client; tests that call tpm2-tools too use swtpm.client() for each step instead."""
    with swtpm.client() as tpm:
        yield tpm


def test_nv_buffer_max_is_the_tpms(client: Tpm) -> None:
    assert client.nv_buffer_max() == 1024  # libtpms' MAX_NV_BUFFER_SIZE, as tpm2_getcap shows


def test_reads_the_hcl_report_the_harness_wrote(swtpm: Swtpm) -> None:
    report = swtpm.provision_report(b"\x11" * 64)
    with swtpm.client() as tpm:
        public = tpm.nv_read_public(HCL_INDEX)
        assert public.data_size == len(report) > 1024  # so the read takes two chunks
        assert public.attributes & gtpm.TPMA_NV_OWNERREAD and public.attributes & gtpm.TPMA_NV_WRITTEN
        assert tpm.nv_read(HCL_INDEX, public.data_size, 1024) == report
        assert tpm.nv_read(HCL_INDEX, public.data_size, 100) == report


def test_defines_writes_and_reads_the_user_data_index(swtpm: Swtpm) -> None:
    attrs = gtpm.TPMA_NV_OWNERWRITE | gtpm.TPMA_NV_OWNERREAD
    with swtpm.client() as client:
        with pytest.raises(TpmError) as e:
            client.nv_read_public(USER_DATA_INDEX)
        assert e.value.rc == 0x18B
        assert str(e.value) == (
            "TPM2_NV_ReadPublic(0x01400002): the TPM answered TPM_RC_HANDLE (handle 1)"
        )
        client.nv_define_space(USER_DATA_INDEX, 64, attrs)
        with pytest.raises(TpmError) as e:
            client.nv_define_space(USER_DATA_INDEX, 64, attrs)
        assert str(e.value) == (
            "TPM2_NV_DefineSpace(0x01400002): the TPM answered TPM_RC_NV_DEFINED (the index "
            "already exists)"
        )
        with pytest.raises(TpmError, match="TPM_RC_NV_UNINITIALIZED"):
            client.nv_read(USER_DATA_INDEX, 64, 1024)
        client.nv_write(USER_DATA_INDEX, bytes(range(64)), 1024)
        assert client.nv_read(USER_DATA_INDEX, 64, 1024) == bytes(range(64))
        public = client.nv_read_public(USER_DATA_INDEX)
        assert (public.data_size, public.attributes & ~gtpm.TPMA_NV_WRITTEN) == (64, attrs)
        with pytest.raises(TpmError) as e:
            client.nv_write(USER_DATA_INDEX, bytes(65), 1024)
        assert "TPM_RC_NV_RANGE" in str(e.value)
    # tpm2-tools reads back what our client wrote.
    assert swtpm.tool("tpm2_nvread", hex(USER_DATA_INDEX), "-C", "o") == bytes(range(64))
    swtpm.tool("tpm2_nvundefine", hex(USER_DATA_INDEX), "-C", "o")


def test_the_attestation_key_is_the_one_tpm2_tools_made(client: Tpm, swtpm: Swtpm) -> None:
    ak = client.read_public(AK_HANDLE)
    numbers = swtpm.ak_public.public_numbers()
    assert (ak.modulus, ak.exponent) == (numbers.n, numbers.e)
    assert (ak.scheme, ak.scheme_hash) == (gtpm.TPM_ALG_RSASSA, gtpm.TPM_ALG_SHA256)
    restricted, sign = 1 << 16, 1 << 18
    assert ak.attributes & restricted and ak.attributes & sign


def test_quote_over_all_pcrs_verifies_under_the_ak(swtpm: Swtpm) -> None:
    nonce = bytes(range(64))
    with swtpm.client() as client:
        quote = client.quote(AK_HANDLE, nonce)
        pcrs = client.pcr_read()
    assert len(pcrs) == 24 and all(len(p) == 32 for p in pcrs)
    assert pcrs[17] == b"\xff" * 32 and pcrs[0] == bytes(32)
    swtpm.ak_public.verify(quote.signature, quote.message, padding.PKCS1v15(), hashes.SHA256())
    # TPMS_ATTEST: magic, type QUOTE, qualifiedSigner, extraData = the nonce, ..., the PCR digest.
    magic, kind, signer_size = struct.unpack_from(">IHH", quote.message)
    assert (magic, kind) == (0xFF544347, 0x8018)
    at = 8 + signer_size
    assert quote.message[at : at + 2 + 64] == b"\x00\x40" + nonce
    selection = b"\x00\x00\x00\x01\x00\x0b\x03\xff\xff\xff"
    assert quote.message.endswith(selection + b"\x00\x20" + hashlib.sha256(b"".join(pcrs)).digest())
    # tpm2-tools reads the same PCR values.
    listing = swtpm.tool("tpm2_pcrread", "sha256:0,17").decode()
    assert f"0x{pcrs[17].hex().upper()}" in listing


def test_a_missing_key_is_named(client: Tpm) -> None:
    with pytest.raises(TpmError) as e:
        client.quote(0x81000099, b"x")
    assert str(e.value) == "TPM2_Quote(0x81000099): the TPM answered TPM_RC_HANDLE (handle 1)"


# --- canned answers: transport and format errors ---------------------------------------------


class Canned:
    """A socketpair whose far end answers each command with the next canned response, one at a
    time as a TPM does (an empty answer closes the connection; no answers left: silence)."""

    def __init__(self, *answers: bytes) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.answers = list(answers)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for a in self.answers:
            if not self.theirs.recv(65536):
                return
            if not a:
                self.theirs.close()
                return
            self.theirs.sendall(a)

    def tpm(self) -> Tpm:
        return Tpm(self.ours.fileno(), timeout=1.0, sleep=lambda _: None)


def answer(rc: int, body: bytes = b"", tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), rc) + body


def test_retry_warnings_are_retried_then_named() -> None:
    c = Canned(answer(0x922), answer(0x922), answer(0, struct.pack(">I", 0) + bytes(8)))
    # Two TPM_RC_RETRY, then success: PCR_Read's answer is parsed (and found empty).
    with pytest.raises(TpmError, match="no SHA-256 PCR values"):
        c.tpm().pcr_read(range(1))
    c = Canned(*(answer(0x922) for _ in range(gtpm.RETRIES + 1)))
    with pytest.raises(TpmError) as e:
        c.tpm().nv_read_public(HCL_INDEX)
    assert str(e.value) == "TPM2_NV_ReadPublic(0x01400001): the TPM answered TPM_RC_RETRY"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (answer(0, b"\x00\x10\x01"), "NV_ReadPublic(0x01400001): response too short for nvPublic"),
        (struct.pack(">HII", 0x8001, 5, 0), "the TPM's answer claims 5 bytes"),
        (struct.pack(">HII", 0x8001, 9000, 0), "the TPM's answer claims 9000 bytes"),
        (b"", "the TPM closed the connection"),
    ],
)
def test_malformed_answers_are_named(response: bytes, message: str) -> None:
    canned = Canned(response)  # kept: its sockets close with it
    with pytest.raises(TpmError) as e:
        canned.tpm().nv_read_public(HCL_INDEX)
    assert message in str(e.value)


def test_a_silent_tpm_times_out() -> None:
    c = Canned()
    with pytest.raises(TpmError) as e:
        c.tpm().nv_read_public(HCL_INDEX)
    assert str(e.value) == "TPM2_NV_ReadPublic(0x01400001): the TPM did not answer within 1 s"


@pytest.mark.parametrize(
    ("rc", "name"),
    [
        (0x18B, "TPM_RC_HANDLE (handle 1)"),
        (0x9A2, "TPM_RC_BAD_AUTH (session 1)"),
        (0x2D5, "TPM_RC_SIZE (parameter 2)"),
        (0x14C, "TPM_RC_NV_DEFINED (the index already exists)"),
        (0x101, "TPM_RC_FAILURE (the TPM is in failure mode)"),
        (0x1E, "a TPM 1.2 response code 0x1e (this is not a TPM 2.0 device)"),
        (0x17F, "response code 0x17f"),
        (0x1FF, "format-one error 0x3f (parameter 1)"),
    ],
)
def test_response_codes_have_names(rc: int, name: str) -> None:
    assert rc_name(rc) == name


def test_opening_a_missing_device_is_named(tmp_path: Path) -> None:
    with pytest.raises(TpmError) as e:
        Tpm.open(str(tmp_path / "tpmrm0"))
    assert str(e.value) == f"cannot open the TPM {tmp_path / 'tpmrm0'}: No such file or directory"
