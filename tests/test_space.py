import json

import numpy as np
import pytest
import yaml

from hatc.arch import Architecture, arch_key, parse_arch_text
from hatc.errors import ArchError, SpaceError
from hatc.features import HAT_FEATURE_NAMES, hat_features, layer_feature_names, layer_features
from hatc.space import BUILTIN_SPACES, SearchSpace, load_space


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_every_shipped_space_loads_and_round_trips(name):
    space = load_space(name)
    assert space.name == name
    assert SearchSpace.from_dict(space.to_dict(), "round trip") == space


def test_spaces_match_hat():
    wmt, iwslt, tiny = (load_space(n) for n in ("wmt", "iwslt", "tiny"))
    assert (wmt.super_embed_dim, wmt.super_ffn_dim, wmt.super_heads, wmt.qkv_dim) == (640, 3072, 8, 512)
    assert wmt.choices["decoder_ffn_dim"] == (3072, 2048, 1024)
    assert wmt.choices["decoder_layers"] == (1, 2, 3, 4, 5, 6) and wmt.choices["encoder_layers"] == (6,)
    assert (iwslt.super_ffn_dim, iwslt.super_heads) == (2048, 4)
    assert iwslt.choices["encoder_self_heads"] == (4, 2) and (iwslt.source_tokens, iwslt.target_tokens) == (23, 23)
    assert (tiny.super_embed_dim, tiny.super_ffn_dim, tiny.qkv_dim) == (256, 1024, 256)
    assert tiny.choices["decoder_ende_layers"] == (1, 2, 3) and tiny.choices["encoder_layers"] == (3,)


def test_user_space_file(tmp_path):
    data = load_space("tiny").to_dict()
    data["name"] = "mine"
    data["choices"]["decoder_layers"] = [1, 2]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(str(path))
    assert space.name == "mine" and space.largest().decoder_layers == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["choices"].update(encoder_ffn_dim=[4096]), "exceeds the super size"),
        (lambda d: d["choices"].update(encoder_self_heads=[3]), "does not divide"),
        (lambda d: d["super"].pop("qkv_dim"), "'super' must have"),
        (lambda d: d["choices"].update(decoder_layers=[]), "non-empty"),
    ],
)
def test_bad_space_file_names_the_problem(tmp_path, edit, message):
    data = load_space("tiny").to_dict()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError, match=message):
        load_space(str(path))


def test_a_space_file_that_is_not_utf8_is_one_line(cli, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    result = cli("arch", "sample", "--space", path)
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{path}: not UTF-8 text (byte offset 9)" in result.stderr


def test_unknown_space_lists_known():
    with pytest.raises(SpaceError, match="wmt, iwslt, tiny"):
        load_space("nope")


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_sample_mutate_crossover_stay_in_space_and_are_seeded(name):
    space = load_space(name)
    rng = np.random.default_rng(7)
    archs = [space.sample(rng) for _ in range(200)]
    assert all(space.contains(a) for a in archs)
    assert len({a.decoder_layers for a in archs}) == len(space.choices["decoder_layers"])
    children = [space.mutate(a, rng, prob=0.3) for a in archs]
    children += [space.crossover(a, b, rng) for a, b in zip(archs, archs[1:])]
    assert all(space.contains(c) for c in children)
    assert sum(c != a for c, a in zip(children, archs)) > 150  # mutation changes most
    again = np.random.default_rng(7)
    assert [space.sample(again) for _ in range(200)] == archs


def test_crossover_takes_genes_from_both_parents():
    space = load_space("wmt")
    a, b = space.largest(), space.smallest()
    rng = np.random.default_rng(0)
    child = space.crossover(a, b, rng)
    genes = set(child.encoder_ffn_dims)
    assert genes <= {3072, 1024} and len(genes) == 2


def test_largest_and_smallest():
    space = load_space("wmt")
    big, small = space.largest(), space.smallest()
    assert big.decoder_layers == 6 and set(big.decoder_ffn_dims) == {3072} and set(big.decoder_ende_layers) == {3}
    assert small.decoder_layers == 1 and small.encoder_embed_dim == 512 and small.decoder_cross_heads == (4,)


def test_hat_yaml_import_export_round_trip(shared_data):
    for path in sorted((shared_data / "hat-configs").glob("*.yml")):
        arch, _ = parse_arch_text(path.read_text(), str(path))
        again, _ = parse_arch_text(arch.to_hat_yaml(), "export")
        assert again == arch
        assert parse_arch_text(arch.to_json(), "json")[0] == arch
    # HAT writes arbitrary attention as -1 (last layer), 1 (last two), 2 (last three).
    arch, _ = parse_arch_text(
        (shared_data / "hat-configs" / "HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.yml").read_text(), "pi"
    )
    assert arch.decoder_ende_layers == (1, 2, 2, 2, 1)


def test_arch_key_is_the_json_and_a_row_dict_keys_the_same():
    space = load_space("tiny")
    a, b = space.smallest(), space.largest()
    assert arch_key(a) == a.to_json() and arch_key(a) != arch_key(b)  # search saves these keys: format fixed
    row = json.loads(json.dumps({"space": "tiny", **dict(reversed(a.to_dict().items()))}))  # as read back
    assert arch_key(row) == arch_key(a)
    assert arch_key(Architecture.from_dict(json.loads(arch_key(a)))) == arch_key(a)


def test_architecture_rejects_wrong_list_length():
    data = load_space("tiny").smallest().to_dict()
    data["decoder_ffn_dims"] = [512, 512]
    with pytest.raises(ArchError, match="'decoder_ffn_dims': has 2 entries but 'decoder_layers' is 1"):
        Architecture.from_dict(data)


def test_hat_features_match_hat_definition(shared_data):
    arch, _ = parse_arch_text(
        (shared_data / "hat-configs" / "HAT_wmt14ende_raspberrypi@5.0s_bleu@27.8.yml").read_text(), "pi"
    )
    feats = dict(zip(HAT_FEATURE_NAMES, hat_features(arch)))
    assert feats["encoder_ffn_embed_dim_avg"] == pytest.approx((3072 * 5 + 2048) / 6)
    assert feats["decoder_layer_num"] == 3
    assert feats["decoder_ende_attention_heads_avg"] == pytest.approx(20 / 3)
    assert feats["decoder_arbitrary_ende_attn_avg"] == pytest.approx(4 / 3)  # layers attended: 1, 2, 1


def test_layer_features_keep_layer_positions():
    space = load_space("wmt")
    rng = np.random.default_rng(0)
    a = space.sample(rng)
    vec = layer_features(a, space)
    assert vec.shape == (len(layer_feature_names(space)),)
    # Swapping two decoder layers keeps HAT's averages but changes the per-layer encoding.
    b = space.largest()
    swapped = Architecture.from_dict({**b.to_dict(), "decoder_ffn_dims": [1024, 3072, 3072, 3072, 3072, 3072]})
    swapped2 = Architecture.from_dict({**b.to_dict(), "decoder_ffn_dims": [3072, 3072, 3072, 3072, 3072, 1024]})
    assert np.array_equal(hat_features(swapped), hat_features(swapped2))
    assert not np.array_equal(layer_features(swapped, space), layer_features(swapped2, space))
