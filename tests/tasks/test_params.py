from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli_main
from model.mec import MECPaths
from model.presets import get_preset
from model.tcm_vae import VIDEO_LAYERS
from tasks.config.params import MEC_PATHS, PRESETS, VALUES_MARK, VIDEO_BASELINES, ParamsError, flatten, load_params, params_to_dict, preset_values

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def preset_params(tmp_path_factory):
    """preset -> the repo's params.yaml after `versvideo init --preset NAME`, loaded."""
    loaded = {}
    for preset in PRESETS:
        path = tmp_path_factory.mktemp(preset) / "params.yaml"
        path.write_bytes(REPO_PARAMS.read_bytes())
        assert cli_main(["init", "--preset", preset, "--params", str(path)]) == 0
        loaded[preset] = load_params(path)
    return loaded


def test_repo_params_load_as_the_smoke_preset_with_every_value_written_out():
    params = load_params(REPO_PARAMS)
    assert params.preset == "smoke"
    assert (params.decode.frames, params.decode.height, params.decode.width) == (8, 64, 64)
    assert not [key for key, value in flatten(yaml.safe_load(REPO_PARAMS.read_text())).items() if value is None]  # DVC sees every value


@pytest.mark.parametrize("preset", PRESETS)
def test_init_writes_a_presets_values_as_null_would_take_them(preset, tmp_path, capsys):
    """`versvideo init --preset` writes concrete values that load exactly as `null` + the preset
    does; comments stay; switching back gives the file back byte for byte; and a preset changed
    without init is refused, naming the command."""
    with_nulls = yaml.safe_load(REPO_PARAMS.read_text())
    with_nulls["preset"] = preset
    for section, keys in preset_values(preset).items():
        with_nulls[section].update(dict.fromkeys(keys))  # the old way: null = the preset decides
    (tmp_path / "nulls.yaml").write_text(yaml.safe_dump(with_nulls))
    path = tmp_path / "params.yaml"
    path.write_bytes(REPO_PARAMS.read_bytes())
    assert cli_main(["init", "--preset", preset, "--params", str(path)]) == 0
    assert load_params(path) == load_params(tmp_path / "nulls.yaml")
    comments = lambda text: [line[line.index("#"):] for line in text.splitlines() if "#" in line and not line.startswith(VALUES_MARK)]  # noqa: E731
    assert comments(path.read_text()) == comments(REPO_PARAMS.read_text())
    assert cli_main(["init", "--preset", "smoke", "--params", str(path)]) == 0
    assert path.read_bytes() == REPO_PARAMS.read_bytes()
    if preset != "smoke":
        capsys.readouterr()
        assert cli_main(["stage", "decode", "--params", str(path), "-S", f"preset={preset}"]) == 2
        assert f"run `versvideo init --preset {preset}`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset, shape",
    [("L", (16, 256, 256)), ("H", (24, 320, 576))],  # the paper's Table 4 video resolutions
)
def test_presets_set_the_paper_clip_shapes(preset, shape, preset_params):
    decode = preset_params[preset].decode
    assert (decode.frames, decode.height, decode.width) == shape


@pytest.mark.parametrize("preset", ["smoke", "L", "H"])
def test_evaluation_guides_as_the_preset_trained_samples_are_guided(preset, preset_params):
    """Table 4's CFG 7.5 for L and H; the smoke preset's own scale, the same in train_unet's
    samples (model/presets.py) and in evaluate."""
    assert preset_params[preset].evaluate.guidance_scale == get_preset(preset).diffusion.guidance_scale
    assert get_preset("L").diffusion.guidance_scale == get_preset("H").diffusion.guidance_scale == 7.5


@pytest.mark.parametrize("preset, sampling", [("smoke", "cubic"), ("L", "uniform"), ("H", "uniform")])
def test_only_the_smoke_controlnet_draws_training_timesteps_at_high_noise(preset, sampling, preset_params):
    """L and H train on uniform timesteps (the paper's, ControlNet's); the smoke ControlNet draws most at high noise."""
    params = preset_params[preset]
    assert params.train_controlnet.timestep_sampling == sampling and params.train_unet.timestep_sampling == "uniform"
    with pytest.raises(ParamsError, match="train_unet.timestep_sampling: 'normal' is not one of uniform, cubic"):
        load_params(REPO_PARAMS, ["train_unet.timestep_sampling=normal"])


@pytest.mark.parametrize("preset, per_gpu, gpus", [("L", 16, 16), ("H", 2, 32)])  # Table 4: batch size per GPU, # GPUs
def test_the_unet_trains_with_table_4s_global_batch(preset, per_gpu, gpus, preset_params):
    unet = preset_params[preset].train_unet
    # clips and images together (joint training): the images a quarter of the rows, as the paper's GPUs
    assert unet.num_workers == gpus and (unet.batch_size + unet.image_batch_size) * unet.grad_accum == per_gpu
    assert unet.global_batch == per_gpu * gpus == {"L": 256, "H": 64}[preset]
    assert {"L": unet.image_batch_size / (unet.batch_size + unet.image_batch_size) == 0.25, "H": unet.image_share == 0.25}[preset]
    assert load_params(REPO_PARAMS, ["train_unet.grad_accum=3", "train_unet.num_workers=2"]).train_unet.global_batch == (6 + 2) * 3 * 2


@pytest.mark.parametrize("overrides, message", [
    (["train_unet.image_batch_size=0"], "images are trained with both above 0, or not at all with both 0"),
    (["train_unet.image_share=0"], "images are trained with both above 0, or not at all with both 0"),
    (["data.images="], "joint image-video training needs an image-text set; set data.images"),
])
def test_joint_training_params_must_agree(overrides, message):
    with pytest.raises(ParamsError, match=message):
        load_params(REPO_PARAMS, overrides)
    assert load_params(REPO_PARAMS, [*overrides, "train_unet.image_share=0", "train_unet.image_batch_size=0"]).train_unet.global_batch == 6


@pytest.mark.parametrize("preset", PRESETS)
def test_the_unet_params_default_to_the_presets_architecture(preset, preset_params):
    """Expert counts and MEC paths are params (for the ablations); by default they are the
    model preset's (Table 4: 32 spatial and 4 temporal experts for L and H, every MEC path)."""
    unet, model = preset_params[preset].train_unet, get_preset(preset).unet
    assert (unet.spatial_experts, unet.temporal_experts) == (model.spatial_experts, model.temporal_experts)
    assert MECPaths.from_names(unet.mec_paths) == model.mec_paths == MECPaths()
    assert MEC_PATHS == tuple(MECPaths.NAMES)  # params' spelling of the path names
    assert VIDEO_BASELINES == VIDEO_LAYERS[1:]  # and of Table 3's video decoders
    with pytest.raises(ParamsError, match="train_decoder.video_baselines: 'conv2d' is not one of conv3d, videoldm"):
        load_params(REPO_PARAMS, ["train_decoder.video_baselines=conv3d,conv2d"])
    with pytest.raises(ParamsError, match="train_unet.mec_paths: unknown path"):
        load_params(REPO_PARAMS, ["train_unet.mec_paths=2d+1d,mse"])
    assert load_params(REPO_PARAMS, ["train_unet.mec_paths=''"]).train_unet.mec_paths == ""


def test_h_shards_the_unet_whose_training_state_outgrows_a_gpu(preset_params):
    assert preset_params["H"].train_unet.strategy == "fsdp"
    assert preset_params["L"].train_unet.strategy == "ddp"
    assert load_params(REPO_PARAMS, ["train_unet.strategy=fsdp"]).train_unet.strategy == "fsdp"


def test_explicit_values_and_overrides_beat_the_preset(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: L\ndecode:\n  frames: 12\n")
    params = load_params(path, ["decode.width=128", "filter.min_motion=0.01", "train_unet.lr=1e-3"])
    assert (params.decode.frames, params.decode.height, params.decode.width) == (12, 256, 128)
    assert params.filter.min_motion == 0.01  # an int-looking override of a float is accepted as float
    assert params.train_unet.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; a float key takes it
    assert flatten(params_to_dict(params))["decode.width"] == 128


@pytest.mark.parametrize(
    "text, message",
    [
        ("filter:\n  min_motoin: 0.1\n", "filter.min_motoin: unknown key (did you mean 'min_motion'?)"),
        ("decod:\n  frames: 8\n", "decod: unknown key (did you mean 'decode'?)"),
        ("decode:\n  frames: eight\n", "decode.frames: expected int, got 'eight'"),
        ("decode:\n  frames: true\n", "decode.frames: expected int, got True"),
        ("train_unet:\n  lr: fast\n", "train_unet.lr: expected float, got 'fast'"),
        ("preset: XL\n", "preset: 'XL' is not one of smoke, L, H"),
        ("filter:\n  scene_cut_policy: ignore\n", "filter.scene_cut_policy: 'ignore' is not one of"),
        ("decode:\n  height: 60\n", "must be multiples of 8"),
        ("filter:\n  clip_min_score: 0.2\n", "filter.clip_weights: required"),
        ("evaluate:\n  protocols: heldout,kinetics\n", "evaluate.protocols: 'kinetics' is not one of heldout, captions, ucf101, msrvtt"),
        ("evaluate:\n  protocols: ucf101\n", "evaluate.ucf101_lists and evaluate.ucf101_videos: required for the ucf101 protocol"),
        ("evaluate:\n  ucf101_split: 4\n", "evaluate.ucf101_split: 4 is not one of 1, 2, 3"),
        ("evaluate:\n  decoder_table: heldin\n", "evaluate.decoder_table: 'heldin' is not one of heldout, captions, ucf101, msrvtt"),
        ("train_unet:\n  strategy: zero3\n", "train_unet.strategy: 'zero3' is not one of ddp, fsdp"),
        ("train_unet:\n  placement: scatter\n", "train_unet.placement: 'scatter' is not one of pack, spread, strict_pack, strict_spread"),
        ("train_decoder:\n  strategy: fsdp\n", "train_decoder.strategy: fsdp is not supported here (the GAN loss"),
        ("train_controlnet:\n  strategy: fsdp\n", "train_controlnet.strategy: fsdp is not supported here (each rank draws its own condition"),
        # non-finite, negative, absurd and contradictory numbers (each passed before)
        ("decode:\n  fps: .inf\n", "decode.fps: inf must be a finite number"),
        ("train_unet:\n  lr: .nan\n", "train_unet.lr: nan must be a finite number"),
        ("evaluate:\n  guidance_scale: .nan\n", "evaluate.guidance_scale: nan must be a finite number"),
        ("filter:\n  min_motion: -.inf\n", "filter.min_motion: -inf must be a finite number"),
        ("filter:\n  max_aspect_ratio: .inf\n", "filter.max_aspect_ratio: inf must be a finite number"),
        ("train_unet:\n  warmup_steps: -5\n", "train_unet.warmup_steps: -5 must be >= 0"),
        ("train_decoder:\n  grad_clip: -1.0\n", "train_decoder.grad_clip: -1.0 must be >= 0"),
        ("train_controlnet:\n  grad_clip: 0\n", "train_controlnet.grad_clip: 0.0 must be > 0"),
        ("train_unet:\n  weight_decay: -0.01\n", "train_unet.weight_decay: -0.01 must be >= 0"),
        ("train_unet:\n  shuffle_buffer: -64\n", "train_unet.shuffle_buffer: -64 must be >= 0"),
        ("prepare:\n  height: 800000\n", "prepare.height: 800000 must be <= 4096"),
        ("decode:\n  width: 80000\n", "decode.width: 80000 must be <= 4096"),
        ("filter:\n  min_fps: 30\n  max_fps: 24\n", "filter.min_fps: 30.0 is above filter.max_fps (24.0)"),
        ("filter:\n  clip_min_score: -2\n", "filter.clip_min_score: -2.0 must be in [-1, 1]"),
        # YAML the loader cannot read, or would read wrongly
        ("train_unet:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "line 4: key 'lr' appears twice in one section (first on line 2)"),
        ("decode:\n  frames: [8\n", "line 3, column 1: not valid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=None) as error:
        load_params(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_malformed_override_is_explained():
    with pytest.raises(ParamsError, match="expected key=value"):
        load_params(REPO_PARAMS, ["decode.frames"])


def test_cli_reports_a_mistyped_key_and_exits_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text("decode:\n  framse: 8\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["stage", "decode"]) == 2
    assert "decode.framse: unknown key (did you mean 'frames'?)" in capsys.readouterr().err


def test_a_negative_clip_score_threshold_is_allowed():
    """The one signed number: a CLIP cosine similarity threshold below 0 keeps more than 0 would."""
    assert load_params(REPO_PARAMS, ["filter.clip_min_score=-0.5"]).filter.clip_min_score == -0.5


@pytest.mark.parametrize("make_bad_file", [lambda path: path.mkdir(), lambda path: path.write_bytes(b"\xff\xfe\x00preset")])
def test_cli_exits_2_naming_an_unreadable_params_file(tmp_path, capsys, monkeypatch, make_bad_file):
    make_bad_file(tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["stage", "decode"]) == 2
    error = capsys.readouterr().err
    assert "versvideo: bad params: params.yaml:" in error and "Traceback" not in error


def test_an_override_that_is_not_yaml_is_explained():
    with pytest.raises(ParamsError, match=r"-S 'decode.fps=\[8': the value is not valid YAML"):
        load_params(REPO_PARAMS, ["decode.fps=[8"])
