"""Config-fragment verification: every requested option must survive, `=n` included."""

from harness.stages.build import dropped_options, read_config_options


def test_reads_set_and_unset_options() -> None:
    text = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_HZ=250\nCONFIG_S=\"x y\"\n# comment\n"
    assert read_config_options(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_HZ": "250",
                                         "CONFIG_S": '"x y"'}


def test_dropped_options_name_requested_and_actual_value() -> None:
    requested = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_HZ": "250"}
    final = {"CONFIG_A": "y", "CONFIG_HZ": "1000"}
    assert dropped_options(requested, final) == ["CONFIG_C=y (got n)", "CONFIG_HZ=250 (got 1000)"]
