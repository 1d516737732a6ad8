"""``hatc arch``: sizes that match HAT's tables, sampling, and clean errors."""

import json
import re
import subprocess

import pytest

from hatc.space import load_space


def _readme_table(shared_data):
    text = (shared_data / "hat-configs" / "README.md").read_text()
    rows = re.findall(r"^\| (HAT_\S+\.yml) \| ([\d.]+) \| ([\d.]+) \|", text, flags=re.M)
    assert len(rows) == 17
    return {name: (float(params), float(gflops)) for name, params, gflops in rows}


def test_info_matches_hats_published_sizes(cli, shared_data):
    table = _readme_table(shared_data)
    for path in sorted((shared_data / "hat-configs").glob("*.yml")):
        result = cli("arch", "info", path, "--json")
        assert result.code == 0, result.stderr
        assert result.stdout.count("\n") == 1  # exactly one compact JSON line
        info = json.loads(result.stdout)
        params_m, gflops = table[path.name]
        assert isinstance(info["params"], int)
        assert abs(info["params"] / 1e6 - params_m) <= 0.01, path.name
        assert abs(info["gflops"] - gflops) <= 0.01, path.name


def test_info_human_output_lists_every_layer(cli, shared_data):
    path = shared_data / "hat-configs" / "HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.yml"
    result = cli("arch", "info", path)
    assert result.code == 0
    assert "48.33M params" in result.stdout
    assert result.stdout.count("encoder ") >= 6 and "decoder 4" in result.stdout


def test_sample_lines_are_valid_architecture_files(cli, tmp_path):
    result = cli("arch", "sample", "--space", "tiny", "--n", "5", "--seed", "3")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and len(set(lines)) > 1
    assert cli("arch", "sample", "--space", "tiny", "--n", "5", "--seed", "3").stdout == result.stdout
    for i, line in enumerate(lines):
        path = tmp_path / f"a{i}.json"
        path.write_text(line)
        # No --space: the line names its own space.
        info = cli("arch", "info", path, "--json")
        assert info.code == 0, info.stderr
        assert json.loads(info.stdout)["space"] == "tiny"
    assert cli("arch", "info", "-", "--json", stdin=lines[0]).code == 0
    assert cli("arch", "info", lines[0], "--json").code == 0  # inline JSON


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_largest_and_smallest_are_accepted(cli, which):
    result = cli("arch", "info", which, "--space", "tiny", "--json")
    assert result.code == 0
    expected = getattr(load_space("tiny"), which)().to_dict()
    assert json.loads(result.stdout)["arch"] == expected


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _tiny_arch(**changes):
    return json.dumps({**load_space("tiny").smallest().to_dict(), **changes})


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("unknown.json", _tiny_arch(bogus=1), "unknown key(s) bogus"),
        ("outside.json", _tiny_arch(encoder_embed_dim=300), "'encoder_embed_dim' = 300 is not in space 'tiny'"),
        ("ffn.json", _tiny_arch(decoder_ffn_dims=[4096]), "'decoder_ffn_dims[0]' = 4096"),
        ("length.json", _tiny_arch(decoder_layers=2), "'decoder_ffn_dims': has 1 entries but 'decoder_layers' is 2"),
        ("type.json", _tiny_arch(encoder_embed_dim="big"), "'encoder_embed_dim': expected positive integers"),
        ("malformed.yml", "encoder_embed_dim: [1, 2\n", "not valid YAML or JSON"),
        ("list.yml", "- 1\n- 2\n", "expected a mapping"),
        (
            "hat.yml",
            "encoder-embed-dim-subtransformer: 512\nencoder-layer-num-subtransformer: 6\n",
            "missing HAT key(s)",
        ),
    ],
)
def test_bad_architecture_files_give_one_clear_line(cli, tmp_path, name, text, expected):
    path = _write(tmp_path, name, text)
    result = cli("arch", "info", path, "--space", "tiny")
    assert result.code == 2
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_hat_file_with_short_list_names_hats_key(cli, shared_data, tmp_path):
    text = (shared_data / "hat-configs" / "HAT_wmt14ende_raspberrypi@4.0s_bleu@26.9.yml").read_text()
    text = text.replace(
        "decoder-ffn-embed-dim-all-subtransformer: [1024, 2048]", "decoder-ffn-embed-dim-all-subtransformer: [1024]"
    )
    result = cli("arch", "info", _write(tmp_path, "short.yml", text))
    assert result.code == 2
    assert "'decoder-ffn-embed-dim-all-subtransformer': has 1 entries" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["arch", "info", "missing.yml"], "missing.yml: no such architecture file"),
        (["arch", "info", "largest", "--space", "nope"], "unknown space 'nope'"),
        (["arch", "sample", "--n", "0"], "--n"),
        (["arch", "frobnicate"], "No such command"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, args, expected):
    result = cli(*args)
    assert result.code == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_installed_entry_point(tmp_path):
    out = subprocess.run(
        ["hatc", "arch", "info", "smallest", "--space", "tiny", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0 and json.loads(out.stdout)["params"] > 0
    bad = subprocess.run(["hatc", "arch", "info", str(tmp_path / "none.yml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "none.yml" in bad.stderr
