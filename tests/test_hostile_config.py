"""Config files a careless or hostile user hands to `poisonlab run`: one short ConfigError naming the file, never a
traceback, a hang or a message of megabytes."""

import pytest

from poisonlab.errors import ConfigError
from poisonlab.experiments.config import load_config, read_config_file
MAX_CONFIG_BYTES, MAX_ERROR_CHARS = 1 << 20, 4000


def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines + [f"seeds: *a{levels}"]) + "\n"


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb(4))  # 10^5 seeds once expanded; nine levels would be 10^10
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and "alias" in msg and "line 2" in msg
    assert len(msg) < 300 and "\n" not in msg


def test_a_single_yaml_alias_is_refused_too(tmp_path):
    f = tmp_path / "alias.yaml"
    f.write_text("dataset: &d {name: digits}\nseeds: [0]\nextra: *d\n")
    with pytest.raises(ConfigError, match=r"alias\.yaml: .*alias.*line 3"):
        read_config_file(f)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_huge_value_does_not_make_a_huge_message(tmp_path, suffix):
    f = tmp_path / f"big{suffix}"
    big = "x" * 200_000
    f.write_text(f'seeds = ["{big}"]\n' if suffix == ".toml" else f'seeds: ["{big}"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: invalid config") and "seeds.0" in msg
    assert len(msg) <= MAX_ERROR_CHARS


def test_many_errors_are_cut_to_a_readable_list(tmp_path):
    f = tmp_path / "many.toml"
    f.write_text("".join(f"unknown_key_{i} = {i}\n" for i in range(500)))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "unknown_key_0: unknown key" in msg and "and 480 more" in msg
    assert len(msg) <= MAX_ERROR_CHARS


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_non_utf8_config_names_the_file_and_the_place(tmp_path, suffix):
    f = tmp_path / f"latin1{suffix}"
    f.write_bytes('name = "caf\xe9"\n'.encode("latin-1") if suffix == ".toml" else 'name: "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"latin1\{suffix}: not UTF-8 text .*line 1"):
        read_config_file(f)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_deep_nesting_is_a_config_error(tmp_path, suffix):
    f = tmp_path / f"deep{suffix}"
    sep = " = " if suffix == ".toml" else ": "
    f.write_text("seeds" + sep + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=rf"deep\{suffix}: .*nested more than"):
        read_config_file(f)


def test_an_oversized_file_is_refused_unread(tmp_path):
    f = tmp_path / "huge.toml"
    f.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=rf"huge\.toml: .*bytes; a config is at most {MAX_CONFIG_BYTES}"):
        read_config_file(f)


def test_a_directory_or_binary_file_is_a_config_error(tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ConfigError, match="dir.toml"):
        read_config_file(d)
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not UTF-8"):
        read_config_file(b)


def test_nesting_the_parser_survives_is_refused_naming_the_field(tmp_path):
    f = tmp_path / "deep40.toml"
    f.write_text("name = 'x'\nseeds = " + "[" * 40 + "1" + "]" * 40 + "\n")
    with pytest.raises(ConfigError, match=r"deep40\.toml: field 'seeds' nests values more than 32 levels deep"):
        read_config_file(f)
    ok = tmp_path / "ok.toml"
    ok.write_text("seeds = " + "[" * 30 + "1" + "]" * 30 + "\n")
    assert read_config_file(ok)["seeds"]
