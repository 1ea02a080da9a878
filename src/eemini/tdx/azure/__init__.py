"""Azure TDX confidential VMs (DCesv5/ECesv5/DCesv6): evidence through the vTPM and the HCL report.

The guest runs behind a paravisor; the TD quote describes the paravisor's TD, and the guest's
identity lives in the vTPM the paravisor provides (docs/verify.md, "Azure evidence"):

    hcl.py       the HCL report (NV index 0x01400001): header, TD report, runtime-data JSON
    tpm.py       TPMS_ATTEST (a TPM2_Quote's message), the PCR digest, the RSASSA check
    tpmlog.py    replaying a TPM event log to PCR values
    evidence.py  reading evidence: our `attest` answer, or trustee's evidence-v1.json
    verify.py    verify_azure(): the named checks, in order
"""
