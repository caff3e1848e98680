"""Recipe files -> typed config: bundled recipes load, every mistake is refused with a message naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from training.recipe import RECIPES_DIR, Recipe, RecipeError, bundled_recipes, load_recipe


def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_loads_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.digest() == recipe.digest()


def test_the_benchmark_recipes_share_one_backbone() -> None:
    """Methods differ only in their method sections: the model, data and optimiser are the base recipe's, except
    the learning-rate drop of LDAM-DRW (its re-weighting starts there)."""
    base = load_recipe(RECIPES_DIR / "_meld_frozen.toml")
    for name in bundled_recipes():
        if name.startswith("meld_"):
            recipe = load_recipe(name)
            optim = dataclasses.replace(recipe.optim, lr_drop_epoch=0) if name == "meld_ldam_drw" else recipe.optim
            assert (recipe.model, recipe.data, optim) == (base.model, base.data, base.optim), name
    assert load_recipe("meld_ldam_drw").optim.lr_drop_epoch > 0


def test_the_earlier_default_keeps_the_pooled_prior_it_was_trained_with() -> None:
    """Recipes default to each corpus's own prior; `default_la`, the text model of 1.0.x and 1.1.0, says `pooled`
    so that it still reproduces those weights. The shipped default trains as its candidate twin."""
    assert load_recipe("default_la").loss.params["prior"] == "pooled"
    assert load_recipe("meld_logit_adjusted").loss.params.get("prior", "per_corpus") == "per_corpus"
    default = load_recipe("default")
    assert load_recipe("default_text_posthoc").training_digest() == default.training_digest()
    assert not default.data.speech and default.posthoc.logit_adjustment == "tune"


def test_unknown_top_level_key_is_refused_naming_it_and_the_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\nepochs = 3\n')
    with pytest.raises(RecipeError, match=r"unknown key\(s\) 'epochs'.*allowed: .*optim"):
        load_recipe(path)


def test_unknown_key_in_a_section_names_the_file_section_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\n[optim]\nlearning_rate = 0.1\n')
    with pytest.raises(RecipeError, match=r"r\.toml \[optim\]: unknown key\(s\) 'learning_rate'; allowed: .*lr"):
        load_recipe(path)


def test_unknown_model_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"\[model\]: unknown key\(s\) 'layers'"):
        load_recipe(_write(tmp_path, 'name = "x"\n[model]\nlayers = 3\n'))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[loss]\nname = "focal"\ngama = 2.0\n', r"\[loss\] 'focal'.*gama"),
        ('[loss]\nname = "hinge"\n', r"\[loss\] 'hinge': unknown loss"),
        ('[sampler]\nname = "oversample"\n', r"\[sampler\] 'oversample': unknown sampler"),
        ('[sampler]\nname = "class_balanced"\nq = 0.5\n', r"takes no parameters"),
        ('[optim]\nepochs = "ten"\n', r"\[optim\] epochs: expected int, got 'ten'"),
        ('[train]\ncontext = "sideways"\n', r"train\.context must be one of"),
        ('[augment]\nmethod = "cutmix"\n', r"augment\.method must be one of"),
        ('[posthoc]\nlogit_adjustment = "auto"\n', r"posthoc\.logit_adjustment"),
        ('[data]\nspeech = ["iemocap"]\n', r"unknown corpora \['iemocap'\]"),
        ("[train]\npatience = true\n", r"patience: expected int, got True"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, f'name = "x"\n{section}'))


def test_a_recipe_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs a non-empty string `name`"):
        load_recipe(_write(tmp_path, "[optim]\nepochs = 2\n"))


def test_extends_merges_tables_and_a_new_method_name_drops_the_old_parameters(tmp_path: Path) -> None:
    _write(
        tmp_path, 'name = "base"\n[optim]\nepochs = 7\nlr = 0.01\n[loss]\nname = "focal"\ngamma = 1.0\n', "base.toml"
    )
    child = load_recipe(
        _write(tmp_path, 'extends = "base.toml"\nname = "child"\n[optim]\nlr = 0.002\n[loss]\nname = "ce"\n')
    )
    assert (child.name, child.optim.epochs, child.optim.lr) == ("child", 7, 0.002)
    assert child.loss.name == "ce" and dict(child.loss.params) == {}
    same_method = load_recipe(_write(tmp_path, 'extends = "base.toml"\nname = "c2"\n[loss]\ngamma = 3.0\n', "c2.toml"))
    assert same_method.loss.name == "focal" and same_method.loss.params["gamma"] == 3.0


def test_an_extends_cycle_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, 'extends = "b.toml"\nname = "a"\n', "a.toml")
    _write(tmp_path, 'extends = "a.toml"\nname = "b"\n', "b.toml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.toml")


def test_method_parameters_reach_the_config_and_model_presets_apply(tmp_path: Path) -> None:
    recipe = load_recipe(
        _write(
            tmp_path,
            'name = "x"\n[model]\npreset = "tiny"\nembed_dim = 24\n[loss]\nname = "ldam"\nmax_margin = 0.3\n'
            's = 20.0\n[optim]\nlr_drop_epoch = 2\n[sampler]\nname = "progressive"\n[augment]\n'
            'method = "manifold_mixup"\n',
        )
    )
    assert recipe.model.text_encoder == "tiny" and recipe.model.embed_dim == 24
    assert dict(recipe.loss.params) == {"max_margin": 0.3, "s": 20.0}
    assert recipe.augment.levels == (0, 1)


def test_ldam_drw_without_a_learning_rate_drop_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"\[loss\] 'ldam'.*lr_drop_epoch"):
        load_recipe(_write(tmp_path, 'name = "x"\n[loss]\nname = "ldam"\n'))
    assert load_recipe(_write(tmp_path, 'name = "x"\n[loss]\nname = "ldam"\ndrw = false\n')).loss.name == "ldam"


def test_seed_changes_the_digest_but_the_stages_after_training_do_not_change_the_training_digest() -> None:
    ce, crt = load_recipe("meld_ce"), load_recipe("meld_crt")
    assert ce.with_seed(1).digest() != ce.digest()
    assert ce.training_digest() == crt.training_digest() and ce.digest() != crt.digest()
    assert load_recipe("meld_focal").training_digest() != ce.training_digest()


def test_a_missing_recipe_lists_the_bundled_ones() -> None:
    with pytest.raises(RecipeError, match="bundled recipes: .*default"):
        load_recipe("no_such_recipe")


def test_a_method_put_on_another_backbone_keeps_its_method_and_takes_the_backbone() -> None:
    from benchmarks.meld_imbalance import method_recipe

    on_ft2 = method_recipe("meld_ldam_drw", "_meld_ft2")
    backbone, own = load_recipe("_meld_ft2"), load_recipe("meld_ldam_drw")
    assert on_ft2.name == "meld_ldam_drw@meld_ft2"
    assert on_ft2.model == backbone.model
    assert on_ft2.optim == dataclasses.replace(backbone.optim, lr_drop_epoch=own.optim.lr_drop_epoch)
    assert on_ft2.model.text_trainable_layers == 2
    assert (on_ft2.loss, on_ft2.train.patience) == (own.loss, own.train.patience)


def test_a_distilled_student_takes_its_teachers_from_the_backbone_it_is_put_on() -> None:
    from benchmarks.meld_imbalance import method_recipe

    for backbone in ("_meld_ft2", "_meld_ft6"):
        student = method_recipe("meld_distill", backbone)
        on = backbone.lstrip("_")
        assert student.distill.teachers == tuple(f"meld_ce@{on}-seed{seed}" for seed in range(3))
        assert student.name == f"meld_distill@{on}"
