import pytest

from retrieval_prune import registry


def test_parse_spec_grammar():
    assert registry.parse_spec("a:x=1, y=two | b") == [("a", {"x": "1", "y": "two"}), ("b", {})]
    assert registry.parse_spec("binary:sign") == [("binary", {"sign": None})]  # bare word
    for bad in ["", "a | | b", "a:=1", "a:x=1,x=2", "a:x,x", "bad name:x=1", "a:x y"]:
        with pytest.raises(ValueError):
            registry.parse_spec(bad)


def test_every_registered_component_round_trips():
    comps = registry.available()
    assert "flat" in comps
    for name, cls in comps.items():
        obj = cls()
        if " | " in obj.spec:  # an index over a codec chain writes its chain too
            from retrieval_prune.pipeline import make_pipeline

            assert make_pipeline(obj.spec).index.spec == obj.spec, name
            continue
        again = registry.build(obj.spec)
        assert again == obj and again.spec == obj.spec, name


def test_unknown_component_lists_what_exists():
    with pytest.raises(ValueError, match="registered: .*flat"):
        registry.get("no-such-thing")


def test_param_conversion_and_errors():
    class Demo(registry.Component):
        name = "demo_test_only"
        stage = "tokens"
        params = {
            "keep": registry.Param(0.5, float, low=0.0, high=1.0),
            "mode": registry.Param("a", str, choices=("a", "b")),
            "n": registry.Param(3, int),
        }

    d = Demo(keep="0.25", n="7")
    assert d.keep == 0.25 and d.n == 7 and d.spec == "demo_test_only:keep=0.25,mode=a,n=7"
    with pytest.raises(ValueError, match="keep=1.5"):
        Demo(keep=1.5)
    with pytest.raises(ValueError, match="not one of"):
        Demo(mode="c")
    with pytest.raises(ValueError, match="not a valid int"):
        Demo(n="x")
    with pytest.raises(ValueError, match="unknown parameter"):
        Demo(bogus=1)
    # a bare word is the value of the one parameter whose choices hold it
    assert registry.parse_spec("x:b")[0][1] == {"b": None}
    assert Demo(**registry.parse_spec("x:b")[0][1]).mode == "b"
