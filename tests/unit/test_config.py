import pytest

from segmentation.config import (
    FALSE_SPELLINGS,
    TRUE_SPELLINGS,
    SettingsError,
    load_settings,
    parse_bool,
)


@pytest.mark.parametrize(
    "raw", ["1", "true", "TRUE", "True", "yes", "YES", "enable", "Enable", " true "]
)
def test_parse_bool_true_spellings(raw: str) -> None:
    assert parse_bool(raw) is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "No", "disable", "DISABLE", "\tno\n"])
def test_parse_bool_false_spellings(raw: str) -> None:
    assert parse_bool(raw) is False


@pytest.mark.parametrize("raw", ["", "2", "on", "off", "y", "truee", "enabled"])
def test_parse_bool_rejects_other_values_and_names_accepted_ones(raw: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bool(raw)
    for spelling in TRUE_SPELLINGS + FALSE_SPELLINGS:
        assert spelling in str(info.value)


def test_use_fp16_defaults_to_true() -> None:
    assert load_settings({}).use_fp16 is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(s, True) for s in TRUE_SPELLINGS]
    + [(s, False) for s in FALSE_SPELLINGS]
    + [("Yes", True), ("DISABLE", False)],
)
def test_use_fp16_reads_every_spelling(raw: str, expected: bool) -> None:
    assert load_settings({"USE_FP16": raw}).use_fp16 is expected


def test_invalid_use_fp16_names_the_variable_and_spellings() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"USE_FP16": "maybe"})
    message = str(info.value)
    assert message.startswith("USE_FP16:")
    assert "'maybe'" in message
    assert "enable" in message and "disable" in message


def test_settings_read_model_sources_from_environment() -> None:
    settings = load_settings(
        {
            "RMBG_MODEL": "/models/RMBG-2.0",
            "RMBG_TRUST_REMOTE_CODE": "yes",
            "YOLO_MODEL": "/models/yolo11x-seg.pt",
            "YOLO_IMGSZ": "1280",
            "DEVICE": "CUDA:1",
        }
    )
    assert settings.rmbg_model == "/models/RMBG-2.0"
    assert settings.rmbg_trust_remote_code is True
    assert settings.yolo_model == "/models/yolo11x-seg.pt"
    assert settings.yolo_imgsz == 1280
    assert settings.device == "cuda:1"


def test_defaults_point_at_real_models() -> None:
    settings = load_settings({})
    assert settings.rmbg_model == "briaai/RMBG-2.0"
    assert settings.yolo_model.startswith("yolo11") and settings.yolo_model.endswith("-seg.pt")
    assert settings.rmbg_trust_remote_code is False
    assert settings.device == "auto"


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"DEVICE": "tpu"}, "DEVICE", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"YOLO_IMGSZ": "650"}, "YOLO_IMGSZ", "multiple of 32"),
        ({"RMBG_INPUT_SIZE": "big"}, "RMBG_INPUT_SIZE", "integer"),
        ({"RMBG_TRUST_REMOTE_CODE": "sure"}, "RMBG_TRUST_REMOTE_CODE", "accepted values"),
        ({"USE_FP8": "sure"}, "USE_FP8", "accepted values"),
        ({"USE_INT8": "2"}, "USE_INT8", "accepted values"),
    ],
)
def test_invalid_settings_name_the_variable(
    env: dict[str, str], variable: str, fragment: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert variable in str(info.value)
    assert fragment in str(info.value)


def test_overrides_win_over_environment() -> None:
    assert load_settings({"USE_FP16": "true"}, use_fp16=False).use_fp16 is False


def test_hf_token_is_not_shown_in_repr() -> None:
    assert "secret" not in repr(load_settings({"HF_TOKEN": "secret"}))


def test_rmbg_compile_adds_the_compiled_blocks_to_the_fast_path() -> None:
    from segmentation.factory import rmbg_steps

    assert rmbg_steps(load_settings({})) is True  # the fast path's default steps
    assert rmbg_steps(load_settings({"RMBG_OPTIMIZED": "no"})) is False
    # the default steps and the compiled parts (compiled blocks replace the blocks' kernels,
    # fuse and attn, where rmbg20_fast.optimize applies them)
    base = ("sdpa", "windows", "decoder", "deform", "resample", "fuse", "attn")
    assert rmbg_steps(load_settings({"RMBG_COMPILE": "Enable"})) == (*base, "compile")
    decoder = rmbg_steps(load_settings({"RMBG_COMPILE": "Decoder"}))
    assert decoder == (*base, "compile-decoder")
    both = rmbg_steps(load_settings({"RMBG_COMPILE": " decoder, BLOCKS "}))
    assert both == (*base, "compile", "compile-decoder")
    assert load_settings({"RMBG_COMPILE": "disable"}).rmbg_compile == ()
    assert load_settings({}, rmbg_compile=True).rmbg_compile == ("blocks",)


@pytest.mark.parametrize("value", ["decoders", "blocks,attention", "maybe"])
def test_rmbg_compile_names_what_it_accepts(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"RMBG_COMPILE": value})
    message = str(caught.value)
    assert message.startswith("invalid settings: RMBG_COMPILE: ")
    assert repr(value) in message and "blocks,decoder" in message and "enable" in message


def test_rmbg_compile_without_the_fast_path_is_refused_with_the_fix() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"RMBG_COMPILE": "true", "RMBG_OPTIMIZED": "false"})
    message = str(caught.value)
    assert "RMBG_COMPILE" in message and "RMBG_OPTIMIZED=true" in message


def test_fp8_and_int8_are_off_by_default() -> None:
    settings = load_settings({})
    assert settings.use_fp8 is False and settings.use_int8 is False
    assert settings.linear_format is None


@pytest.mark.parametrize("variable", ["USE_FP8", "USE_INT8"])
@pytest.mark.parametrize(
    ("raw", "expected"),
    [(s, True) for s in TRUE_SPELLINGS]
    + [(s, False) for s in FALSE_SPELLINGS]
    + [("YES", True), ("Disable", False)],
)
def test_fp8_and_int8_read_every_boolean_spelling(variable: str, raw: str, expected: bool) -> None:
    settings = load_settings({variable: raw})
    assert getattr(settings, variable.lower()) is expected
    wanted = variable.removeprefix("USE_").lower() if expected else None
    assert settings.linear_format == wanted


def test_fp8_and_int8_together_are_refused_naming_both() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"USE_FP8": "true", "USE_INT8": "1"})
    message = str(caught.value)
    assert "USE_FP8 and USE_INT8 are both set" in message and "choose one" in message


def test_fp8_with_int8_off_is_fine() -> None:
    assert load_settings({"USE_FP8": "true", "USE_INT8": "false"}).linear_format == "fp8"
