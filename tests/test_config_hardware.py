"""Config profiles and overrides, and hardware choices from faked device descriptions."""

import dataclasses
import json

import pytest

from mcvqa.core.config import ConfigError, Config, parse_overrides, resolve_config, save_config
from mcvqa.core.hardware import choose_hardware, detect_hardware

T4 = {"name": "Tesla T4", "capability": (7, 5), "memory_gib": 14.7}
A100 = {"name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "memory_gib": 39.4}


def test_kaggle_profile_on_two_t4s_uses_fp16_sdpa_and_kaggle_paths():
    cfg = resolve_config("auto", env={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, verbose=False)
    assert cfg.profile == "kaggle_t4x2"
    assert cfg.output_dir.startswith("/kaggle/working") and cfg.submission_path == "/kaggle/working/submission.csv"
    assert cfg.data_dir == "auto"
    hw = choose_hardware([T4, T4], cfg.dtype, cfg.attn_implementation, flash_attn_installed=True)
    assert (hw.dtype, hw.attn_implementation, hw.use_grad_scaler, hw.gpu_count) == ("float16", "sdpa", True, 2)
    assert any("no bf16" in r for r in hw.reasons)


def test_colab_profile_on_a100_uses_bf16_and_drive_paths():
    cfg = resolve_config("auto", env={"COLAB_RELEASE_TAG": "release-colab"}, verbose=False,
                         gpu=("NVIDIA A100-SXM4-40GB", 39.4))
    assert cfg.profile == "colab_a100" and cfg.output_dir.startswith("/content/drive/")
    hw = choose_hardware([A100], cfg.dtype, cfg.attn_implementation, flash_attn_installed=False)
    assert (hw.dtype, hw.attn_implementation, hw.use_grad_scaler) == ("bfloat16", "sdpa", False)
    hw = choose_hardware([A100], cfg.dtype, cfg.attn_implementation, flash_attn_installed=True)
    assert hw.attn_implementation == "flash_attention_2"


def test_cpu_is_fp32_and_t4_never_gets_flash_attention_or_bf16():
    hw = choose_hardware([], flash_attn_installed=True)
    assert (hw.device, hw.dtype, hw.attn_implementation) == ("cpu", "float32", "sdpa")
    assert choose_hardware([T4], flash_attn_installed=True).attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="no bf16"):
        choose_hardware([T4], dtype="bfloat16")


def test_detect_hardware_prints_its_reasons(capsys):
    detect_hardware(resolve_config("demo", env={}, verbose=False), gpus=[T4, T4])
    out = capsys.readouterr().out
    assert "2 x Tesla T4" in out and "float16" in out and "because" in out


def test_a_misspelt_setting_says_what_was_meant_and_where_it_came_from():
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch' \(override epoch=2\)\. Did you mean epochs\?$"):
        resolve_config("demo", ["epoch=2"], env={}, verbose=False)
    with pytest.raises(ConfigError, match=r"'lora_rank' \(environment variable MCVQA_LORA_RANK\)\. Did you mean lora_r"):
        resolve_config("demo", env={"MCVQA_LORA_RANK": "8"}, verbose=False)
    with pytest.raises(ConfigError, match="unknown profile 'kaggle_t4' \\(did you mean kaggle_t4x2\\?\\)"):
        resolve_config("kaggle_t4", env={}, verbose=False)


def test_several_settings_on_one_overrides_line_are_refused_with_one_per_line():
    """OVERRIDES = "epochs=2 max_pixels=602112" made epochs the string "2 max_pixels=602112"."""
    for line in ("epochs=2 max_pixels=602112", "epochs=2, max_pixels=602112", "epochs=2;max_pixels=602112"):
        with pytest.raises(ConfigError, match="holds several settings on one line; put one setting per line, "
                                              "e.g.\nepochs=2\nmax_pixels=602112$"):
            resolve_config("demo", line, env={}, verbose=False)
    # A value may hold spaces and "=" where no setting name follows.
    assert resolve_config("demo", "instruction=a = b, c d", env={}, verbose=False).instruction == "a = b, c d"


def test_precedence_defaults_profile_env_overrides(tmp_path):
    cfg = resolve_config("demo", env={"MCVQA_EPOCHS": "7", "MCVQA_LORA_R": "4"}, overrides=["epochs=9"], verbose=False)
    assert cfg.epochs == 9  # override beats env
    assert cfg.lora_r == 4  # env beats profile
    assert cfg.micro_batch_size == 16  # profile beats default
    assert cfg.lora_alpha == Config().lora_alpha  # default
    cfg = resolve_config("demo", overrides="shuffle_options=false\nlearning_rate=3e-4\n# comment", env={}, verbose=False)
    assert cfg.shuffle_options is False and cfg.learning_rate == 3e-4
    saved = json.loads(save_config(cfg, tmp_path).read_text())
    assert saved["learning_rate"] == 3e-4 and saved["profile"] == "demo"


def test_bad_overrides_fail_clearly():
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        resolve_config("demo", overrides=["epoch=2"], env={}, verbose=False)
    with pytest.raises(ValueError, match=r"epochs expects a whole number \(e\.g\. 602112 or 768\*768\), got 'two'"):
        resolve_config("demo", overrides=["epochs=two"], env={}, verbose=False)
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_config("kaggle", env={}, verbose=False)
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["epochs"])


def test_resume_refuses_a_folder_whose_folds_saw_other_prompts(tmp_path):
    """A re-run into a run folder with folds checks the prompt/image settings saved there: a changed
    instruction_first (also in configs saved before it existed, when the instruction came last) stops
    with the setting and the fix; the same settings, or a folder without folds, go on."""
    from mcvqa.core.config import check_resume

    cfg = resolve_config("demo", env={}, verbose=False)
    save_config(cfg, tmp_path)
    check_resume(cfg, tmp_path)  # no folds yet
    (tmp_path / "fold0").mkdir()
    check_resume(cfg, tmp_path)  # same settings
    old = dataclasses.replace(cfg, instruction_first=False)
    with pytest.raises(ValueError, match=r"instruction_first: True then, False now.*instruction_first=True"):
        check_resume(old, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["instruction_first"]  # a config saved by a version without the setting
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume(old, tmp_path)
    with pytest.raises(ValueError, match="instruction_first"):
        check_resume(cfg, tmp_path)


def test_colab_picks_the_profile_from_the_card_it_finds(capsys):
    colab = {"COLAB_RELEASE_TAG": "release-colab"}
    t4 = resolve_config("auto", env=colab, gpu=("Tesla T4", 14.7))
    assert t4.profile == "colab_t4" and "3B" in t4.model_name_or_path and t4.max_pixels == Config().max_pixels
    assert "Tesla T4 (15 GiB < 30): 3B at 448x448" in capsys.readouterr().out
    a100 = resolve_config("auto", env=colab, gpu=("NVIDIA A100-SXM4-80GB", 79.2), verbose=False)
    assert a100.profile == "colab_a100" and "7B" in a100.model_name_or_path and a100.max_pixels == 768 * 768
    assert resolve_config("auto", env=colab, gpu=None, verbose=False).profile == "demo"  # no GPU runtime
    assert resolve_config("auto", env={}, gpu=("NVIDIA H100", 79.6), verbose=False).profile == "local_gpu"
