"""Stage `train_unet`: the paper's stage 1, text-to-video training of the denoising UNet on the
latent cache, on the training engine (tasks/training/engine.py).

Per step (section 2, Table 4): v-prediction loss (model/diffusion.py) at a uniform timestep; the
caption's context replaced by the empty prompt's with p = text_dropout (classifier-free
guidance); in every micro-step, beside the clips, image_batch_size image-text pairs as one-frame
latents (data/latents/images), their loss weighted image_share (joint image-video training,
section 3.1); after every optimizer step the experts of each MoE layer are pulled towards each
other's mean (eq. 7-8). The output, models/unet/, holds merged-expert inference weights
(section 2.2) + config.json + metrics.json.
"""

from __future__ import annotations

from tasks.config.params import Params
from tasks.config.paths import TRAIN_UNET_METRICS, TRAIN_UNET_REPORT, UNET, UNET_PLOTS
from tasks.storage.atomic import write_json, write_metrics
from tasks.training.curves import write_loss_curves
from tasks.training.unet import swap_gap_figures, train_unet


def main(params: Params) -> None:
    metrics = train_unet(params)
    write_json(metrics, TRAIN_UNET_REPORT)
    reading = metrics.get("caption_reading", {})
    # v-loss, last 10 % of steps; and how much worse the loss gets with one caption word swapped (0: the word is ignored)
    write_metrics({"loss": metrics.get("loss_last_10pct"), **swap_gap_figures(reading)}, TRAIN_UNET_METRICS)
    write_loss_curves({"unet": metrics["mlflow_run_id"]}, UNET_PLOTS, "train_unet: v-prediction loss")
    print(f"train_unet: {metrics['steps']} steps; loss {metrics.get('loss_first_10pct', float('nan')):.4f} (first 10%) -> "
          f"{metrics.get('loss_last_10pct', float('nan')):.4f} (last 10%); data wait {metrics.get('mean_data_wait_share', 0):.1%} of step time; "
          f"MLflow run {metrics['mlflow_run_id']}; weights in {UNET}/")
    for word, figures in reading.items():
        print(f"  reads the {word}: {'yes' if figures['reads'] else 'no'}; v-loss at t in [700, 1000) on {figures['clips']} held-out clips "
              f"{figures['loss_true']:.4f} with the caption, {figures['loss_swapped']:.4f} with the {word} swapped "
              f"({figures['relative']:+.1%}; 95 % interval of the gap [{figures['gap_low']:+.4f}, {figures['gap_high']:+.4f}])")
