# Two commands do all the set-up on a fresh machine with Python >= 3.11, pip and make:
#   make demo   runs the pipeline on the embedded default data (smoke preset)
#   make test   runs the test suite
# Both bootstrap uv (into .tools/, pinned) and the locked environment (.venv/, from uv.lock).

UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/uv/bin/uv
RUN := $(UV) run --locked --no-sync

.PHONY: setup demo test bench clean

$(UV):
	PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
		--target $(TOOLS)/uv "uv==$(UV_VERSION)"

.venv/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --locked
	touch $@

setup: .venv/.synced

demo: setup
	$(RUN) versvideo pipeline
	@echo
	@$(RUN) dvc metrics show
	@echo
	@echo "Outputs: data/raw (videos + CSV), data/filtered (kept/rejected.parquet), data/clips (clip shards),"
	@echo "         data/latents (latent shards), models/unet (merged-expert UNet weights + config.json + metrics.json),"
	@echo "         models/decoder (TCM-VAE; image_decoder/ beside it), models/controlnet, reports/*.json (every figure with its"
	@echo "         baseline and protocol), metrics/*.json (headline numbers: $(RUN) dvc metrics show), plots/ (loss curves, per-frame)"
	@echo "MLflow:  $(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db, then open the route reports/pipeline.md gives"
	@echo "         (experiment 'versvideo' in the model-training view: a 'pipeline' run with a nested run per stage;"
	@echo "         loss curves, training and evaluation MP4/GIF samples under them; registered model versvideo@champion)"
	@echo "Samples: the evaluate run's artifacts (samples/*.mp4, *.gif); plots: $(RUN) dvc plots show (dvc_plots/index.html)"
	@echo "Prefect: reports/pipeline.md (stages, status, seconds); the same summary is the flow run's Markdown artifact"

test: setup
	$(RUN) pytest

bench: setup
	$(RUN) versvideo bench decode --json
	$(RUN) versvideo bench unet --json
	$(RUN) versvideo bench cache --json
	$(RUN) versvideo bench train --json

clean:
	rm -rf data models metrics plots mlruns mlflow.db .dvc/tmp .pytest_cache
