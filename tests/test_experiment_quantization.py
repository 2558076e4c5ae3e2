"""The quantization experiment (glm5_ref/apps/experiments/quantization.py): the quick run writes the schema the
README reads; the full run refuses without the shipped checkpoint."""

import json

import pytest

from glm5_ref.apps import experiments
from glm5_ref.apps.experiments import quantization as q


def test_quick_run_writes_the_schema(tmp_path):
    result = q.run(quick=True, out_dir=str(tmp_path))
    saved = json.loads((tmp_path / "quantization.json").read_text())
    assert (tmp_path / "quantization.png").is_file() and saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["scheme"] for r in saved["rows"]] == [name for name, _ in q.SCHEMES]
    for row in saved["rows"]:
        assert set(row) == {"scheme", "bits_per_byte", "delta_bits_per_byte", "top1_agreement", "accept_length"}
        assert 0 < row["bits_per_byte"] < 10 and 0 <= row["top1_agreement"] <= 1
    assert saved["rows"][0]["delta_bits_per_byte"] == 0 and saved["rows"][0]["top1_agreement"] == 1
    assert {"ptq_bits_per_byte", "finetune_then_ptq_bits_per_byte", "qat_bits_per_byte"} <= set(saved["qat"])
    assert 0 < saved["fp8_indexer"]["ue8m0_mean"] <= 1 and saved["streaming"]["seconds_per_token"] > 0
    assert "| w4a8_experts+w8a8 |" in q.markdown(saved)
    assert "quantization" in experiments.EXPERIMENTS


def test_the_full_run_needs_the_shipped_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="recipe ship"):
        q.run(quick=False, out_dir=str(tmp_path), model_dir=str(tmp_path / "missing"))
