"""Pipeline text and YAML recipes: parsing, canonical text, errors that point at the column or name the option."""
from __future__ import annotations

import pytest

from graphopt.errors import PassOptionError, PipelineSyntaxError
from graphopt.pm import build_passes, format_pipeline, load_pipeline, parse_pipeline


def test_parse_names_and_options():
    specs = parse_pipeline("fold-bn, prune-channels{ratio=0.5 importance=l2},select{candidates=dense,csr,bsr4x4}")
    assert [s.name for s in specs] == ["fold-bn", "prune-channels", "select"]
    assert specs[1].options == {"ratio": "0.5", "importance": "l2"}
    assert specs[2].options == {"candidates": "dense,csr,bsr4x4"}
    assert format_pipeline(specs) == "fold-bn,prune-channels{ratio=0.5 importance=l2},select{candidates=dense,csr,bsr4x4}"


def test_quoted_values():
    (spec,) = parse_pipeline('x{name="a b}" other=1 pat="a,b=c"}')
    assert spec.options == {"name": "a b}", "other": "1", "pat": "a,b=c"}


@pytest.mark.parametrize("text,col,what", [
    ("", 0, "empty pipeline"),
    ("fold-bn,", 7, "trailing"),
    ("fold-bn{ratio=0.5", 17, "missing '}'"),
    ("fold-bn{ratio}", 13, "expected '='"),
    ("fold-bn fold-constants", 8, "expected ','"),
    ("fold-bn{=3}", 8, "expected an option name"),
    ("fold-bn{a=1 a=2}", 12, "given twice"),
    ("fold-bn,,dce", 8, "expected a pass name"),
    ("mixed-precision{budget=latency,target=0.7}", 30, "write 'budget=latency target=0.7'"),
    ("select{candidates=dense,csr,min-speedup=2}", 27, "separated by spaces, not commas"),
])
def test_syntax_errors_point_at_column(text, col, what):
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline(text)
    assert e.value.col == col, str(e.value)
    assert what in str(e.value)
    assert "^" in str(e.value)


def test_unknown_pass_suggests():
    with pytest.raises(PassOptionError, match="unknown pass 'fold-bm'.*did you mean 'fold-bn'"):
        build_passes(parse_pipeline("fold-bm"))


@pytest.mark.parametrize("name, meant", [("prune-unstructured", "'sparsify{sparsity=0.8}'"),
                                         ("nm-sparsity", "'sparsify-nm{n=2 m=4}'"),
                                         ("prune-heads", "'prune-channels{heads-only=true"),
                                         ("ptq", "is 'quantize'"),
                                         ("fp32-to-int4", "'quantize{weights=int4}'")])
def test_unknown_pass_named_as_other_tools_name_it(name, meant):
    """A rewrite asked for by another tool's name gets graphopt's pass (and a working option) in the error."""
    with pytest.raises(PassOptionError) as e:
        build_passes(parse_pipeline(name))
    assert meant in str(e.value)
    passes = build_passes(parse_pipeline(str(e.value).split("'")[3]))  # the suggested text itself parses
    assert passes


def test_unknown_and_bad_options_name_pass_and_option():
    with pytest.raises(PassOptionError, match="pass 'fold-constants' has no option 'max-grow'.*max-growth"):
        build_passes(parse_pipeline("fold-constants{max-grow=2}"))
    with pytest.raises(PassOptionError, match="pass 'fold-constants' option 'max-growth': expected a number"):
        build_passes(parse_pipeline("fold-constants{max-growth=lots}"))
    with pytest.raises(PassOptionError, match="pass 'fold-constants' option 'max-growth' must be >= 1"):
        build_passes(parse_pipeline("fold-constants{max-growth=0.5}"))
    with pytest.raises(PassOptionError, match="pass 'fold-bn' has no option 'x' .options: none"):
        build_passes(parse_pipeline("fold-bn{x=1}"))


def test_yaml_recipe_equals_text(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - fold-bn\n  - fold-constants: {max-growth: 2}\n  - dce\n")
    text = "fold-bn,fold-constants{max-growth=2},dce"
    from_yaml = [p.spec_text() for p in build_passes(load_pipeline(str(recipe)))]
    from_text = [p.spec_text() for p in build_passes(load_pipeline(text))]
    assert from_yaml == from_text == ["fold-bn", "fold-constants{max-growth=2.0}", "dce"]
    recipe.write_text("pipeline: 'fold-bn,dce'\n")
    assert [s.name for s in load_pipeline(str(recipe))] == ["fold-bn", "dce"]


def test_bad_recipes(tmp_path):
    with pytest.raises(PassOptionError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [a]\n")
    with pytest.raises(PassOptionError, match="'pipeline' key"):
        load_pipeline(str(bad))
    bad.write_text("pipeline: [fold-bn, {a: 1, b: 2}]\n")
    with pytest.raises(PassOptionError, match="entry #2"):
        load_pipeline(str(bad))
