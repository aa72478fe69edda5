"""The --NAME=value override mechanism shared by every stage script."""

import pytest

import config as C
from rlhf.settings import UserError, apply_overrides, parse_value


@pytest.fixture(autouse=True)
def restore_config():
    saved = {k: v for k, v in vars(C).items() if k.isupper()}
    yield
    for k, v in saved.items():
        setattr(C, k, v)


def test_override_changes_the_constant_with_its_type():
    changes = apply_overrides(["--LR=3e-4", "--BATCH_SIZE=4", "--USE_LORA=true", "--MODEL_NAME=some/model"], quiet=True)
    assert C.LR == 3e-4 and isinstance(C.LR, float)
    assert C.BATCH_SIZE == 4 and isinstance(C.BATCH_SIZE, int)
    assert C.USE_LORA is True
    assert C.MODEL_NAME == "some/model"
    assert set(changes) == {"LR", "BATCH_SIZE", "USE_LORA", "MODEL_NAME"}


def test_names_are_case_insensitive_and_dashes_allowed():
    apply_overrides(["--lr=0.5", "--grad-accum=3"], quiet=True)
    assert C.LR == 0.5 and C.GRAD_ACCUM == 3


def test_unknown_name_lists_close_matches():
    with pytest.raises(UserError, match="unknown setting --BATCHSIZE.*BATCH_SIZE"):
        apply_overrides(["--BATCHSIZE=4"], quiet=True)


def test_type_is_checked():
    with pytest.raises(UserError, match="integer"):
        apply_overrides(["--BATCH_SIZE=four"], quiet=True)
    with pytest.raises(UserError, match="integer"):
        apply_overrides(["--EPOCHS=1.5"], quiet=True)
    with pytest.raises(UserError, match="true or false"):
        apply_overrides(["--USE_LORA=maybe"], quiet=True)
    with pytest.raises(UserError, match="number"):
        apply_overrides(["--LR=fast"], quiet=True)


def test_integer_written_as_float_is_accepted():
    assert parse_value("X", "1e3", 5) == 1000


def test_argument_without_equals_is_an_error():
    with pytest.raises(UserError, match="--NAME=value"):
        apply_overrides(["--LR", "3e-4"], quiet=True)


def test_each_change_is_printed(capsys):
    apply_overrides(["--EPOCHS=2"])
    assert "EPOCHS = 2" in capsys.readouterr().out
