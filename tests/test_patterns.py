"""The one module-selection pattern type: fnmatch on name or class name, ``re:`` for a regex."""

import pytest
from torch import nn

from lightning_latency.patterns import compile_pattern, compile_patterns, matches_any


def test_fnmatch_matches_the_whole_name_or_the_class_name():
    ln = nn.LayerNorm(4)
    assert compile_pattern("*attention*").matches("encoder.layer.0.attention.self.query")
    assert not compile_pattern("attention").matches("encoder.layer.0.attention.self.query")  # whole name
    assert compile_pattern("*LayerNorm*").matches("encoder.ln", ln)
    assert not compile_pattern("*LayerNorm*").matches("encoder.ln")


def test_regex_prefix_searches_the_name():
    p = compile_pattern(r"re:layer\.[0-1]\.")
    assert p.matches("encoder.layer.1.output") and not p.matches("encoder.layer.2.output")
    assert matches_any(compile_patterns(["*pooler*", r"re:^lm_head$"], "exclude"), "lm_head")


@pytest.mark.parametrize("bad, match", [("re:(", "not a valid regular expression after 're:'"),
                                        ("", "non-empty strings"), (3, "non-empty strings")])
def test_bad_patterns_name_the_argument_and_the_fix(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        compile_patterns([bad], "targets")
    assert "`targets`" in str(info.value)
