"""Bad input: a ValueError that names the argument (and the shapes)."""

import pytest
import torch

import ngkernels


def _v(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("call, match", [
    (lambda: ngkernels.normguard_loss(_v(2, 3), _v(2, 4)), r"v_ref.*\(2, 4\).*\(2, 3\)"),
    (lambda: ngkernels.flow_matching_loss(_v(2, 3), _v(3, 3)), r"target.*\(3, 3\).*\(2, 3\)"),
    (lambda: ngkernels.fm_normguard_loss(_v(2, 3), _v(2, 3), _v(2, 3, 1)), r"v_ref.*shape"),
    (lambda: ngkernels.flow_matching_loss(_v(2, 3), _v(2, 3), weight=_v(3)), r"weight.*\(2,\).*\(3,\)"),
    (lambda: ngkernels.flow_matching_loss(_v(2, 3), _v(2, 3), weight=_v(2, 1)), r"weight"),
    (lambda: ngkernels.normguard_loss(torch.tensor(1.0), torch.tensor(1.0)), r"batch dimension"),
    (lambda: ngkernels.normguard_loss(_v(2, 3), _v(2, 3), reduction="avg"), r"reduction.*'avg'"),
    (lambda: ngkernels.normguard_loss(_v(2, 3), _v(2, 3), margin=-1.0), r"margin"),
    (lambda: ngkernels.normguard_loss(_v(2, 3), _v(2, 3), margin=float("nan")), r"margin"),
    (lambda: ngkernels.normguard_loss(torch.ones(2, 3, dtype=torch.long), _v(2, 3)), r"v must be a floating"),
    (lambda: ngkernels.normguard_loss(_v(2, 3), [1.0, 2.0]), r"v_ref"),
], ids=["ref-shape", "target-shape", "ref-rank", "weight-len", "weight-rank", "no-batch", "reduction",
        "margin", "margin-nan", "int-v", "list-ref"])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_device_mismatch_names_argument():
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"v_ref is on meta"):
        ngkernels.normguard_loss(_v(2, 3), meta)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("NGKERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="NGKERNELS_BACKEND"):
        ngkernels.normguard_loss(_v(2, 3), _v(2, 3))
