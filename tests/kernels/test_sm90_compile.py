"""Every Triton kernel configuration compiles for sm_90 without a GPU, without spills, in shared memory."""

from __future__ import annotations

import json

import pytest
from _kernel_checks import SM90_JSON

TIMEOUT_S = 900  # 111 builds on one worker


@pytest.mark.background("sm90")
def test_all_kernels_compile_for_sm90(background_job):
    code, log = background_job.wait(TIMEOUT_S)
    print(log)  # the markdown table: registers, spills and shared memory per kernel and config
    results_path = background_job.workdir / SM90_JSON
    assert results_path.exists(), f"the sm_90 compile report did not finish:\n{log[-4000:]}"
    results = json.loads(results_path.read_text())
    kernels = {r["spec"]["kernel"] for r in results}
    assert kernels == {"fwht_pass_kernel", "masked_lowrank_fwd_kernel", "masked_lowrank_bwd_rows_kernel",
                       "masked_lowrank_bwd_weights_kernel"}
    failures = [f"{r['spec']['kernel']} [{r['spec']['config']}]: {'; '.join(r['problems'])}"
                for r in results if r["problems"]]
    assert not failures, "\n".join(failures)
    assert code == 0
