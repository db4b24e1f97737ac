import pytest

from model.summary import model_summary


@pytest.mark.parametrize("preset", ["L", "H"])
def test_totals_against_the_papers_table_4(preset):
    summary = model_summary(preset)
    # SD's KL-f8 VAE and CLIP ViT-L/14's text tower have these published sizes
    assert summary["image_vae"] == 83_653_863
    assert 123_000_000 < summary["text_encoder"] < 124_000_000
    assert summary["unet_training_with_experts"] > 4 * summary["unet_inference_merged"]  # 32 + 4 experts
    # With the unified ControlNet the totals are within 3% of the paper's 500 M / 2 B (README).
    assert summary["ratio_with_controlnet_vs_paper"] == pytest.approx(1.0, abs=0.03)
    assert summary["ratio_text_to_video_vs_paper"] < 0.82


def test_smoke_is_tiny():
    summary = model_summary("smoke")
    assert summary["unet_inference_merged"] < 5_000_000 and summary["image_vae"] == 0
