"""Recipes by hand: a variant swaps exactly one part, invalid combinations are refused."""

import dataclasses

import pytest

from atlasfl.strategies import METHODS
from atlasfl.strategies.aggregators import Mean
from atlasfl.strategies.methods import EQUAL, NEVER, variant
from atlasfl.strategies.objective import Proximal
from atlasfl.strategies.personal import LaplacianStep
from atlasfl.strategies.rank_plan import NoPlan
from atlasfl.strategies.recipe import differing_parts
from atlasfl.strategies.split_learning import Splitting


def test_a_variant_swaps_exactly_one_part_and_names_what_it_ablates():
    atlas = METHODS["atlas"]
    homo = variant(atlas, "homo", "equal ranks", paper="P", ranks=EQUAL)
    assert (homo.name, homo.summary, homo.paper, homo.ablates) == ("homo", "equal ranks", "P",
                                                                   "atlas")
    assert homo.ranks == EQUAL and differing_parts(homo, atlas) == ["ranks"]
    assert homo.parts() == {**atlas.parts(), "ranks": "equal"}
    assert variant(atlas, "p", "no paper", ranks=EQUAL).paper == ""
    with pytest.raises(ValueError, match="^two: a variant swaps exactly one of grouping, ranks, "
                                         "split, aggregation, personal, objective$"):
        variant(atlas, "two", "two parts", ranks=EQUAL, split=NEVER)
    with pytest.raises(ValueError, match="exactly one"):
        variant(atlas, "none", "no part")
    with pytest.raises(ValueError, match="exactly one"):
        variant(atlas, "pooled", "not a part", pools_data=True)


def test_parts_and_their_differences_in_kind_order():
    atlas, local = METHODS["atlas"], METHODS["local"]
    assert atlas.parts() == {"grouping": "cluster", "ranks": "device", "split": "config",
                             "aggregation": "mixed", "personal": "laplacian",
                             "objective": "plain"}
    assert differing_parts(atlas, local) == ["grouping", "ranks", "split", "aggregation",
                                             "personal"]
    assert differing_parts(atlas, atlas) == []


def test_invalid_combinations_are_refused_naming_why():
    atlas = METHODS["atlas"]
    with pytest.raises(ValueError, match="split learning needs a rank plan"):
        dataclasses.replace(METHODS["fedavg"], split=Splitting("always"))
    with pytest.raises(ValueError, match="split learning needs a rank plan"):
        dataclasses.replace(atlas, ranks=NoPlan())
    with pytest.raises(ValueError, match="split learning needs a rank plan"):
        dataclasses.replace(atlas, aggregation=Mean())
    dataclasses.replace(atlas, split=NEVER, aggregation=Mean())  # no split: any aggregation
    dataclasses.replace(METHODS["local"], summary="valid")  # no uploads, nothing personal
    with pytest.raises(ValueError, match="personalisation needs uploads"):
        dataclasses.replace(METHODS["local"], personal=LaplacianStep())
    with pytest.raises(ValueError, match="proximal term across a cut"):
        dataclasses.replace(atlas, objective=Proximal())
    dataclasses.replace(atlas, split=NEVER, objective=Proximal())  # whole-model: allowed
