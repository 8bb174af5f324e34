"""gateway/config/routes.py: the wildcard prefix index against the plain scan it replaced."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.providers import Provider, Timeouts
from gateway.config.routes import Model, Target, WildcardIndex

PROVIDER = Provider(name="p", base_url="http://127.0.0.1:9/v1", timeout=Timeouts())


def pattern(slug: str) -> Model:
    return Model(slug=slug, id=slug, name=slug, targets=(Target(PROVIDER, None),))


def scan(patterns: tuple[Model, ...], slug: str) -> Model | None:
    """What resolve did before the index: the first matching pattern, longest first."""
    for model in patterns:
        prefix, _, suffix = model.slug.partition("*")
        if (
            len(slug) > len(prefix) + len(suffix)
            and slug.startswith(prefix)
            and slug.endswith(suffix)
        ):
            return model
    return None


def ordered(slugs: list[str]) -> tuple[Model, ...]:
    # As routes.py orders them: longest first, file order among equals (a stable sort).
    unique = list(dict.fromkeys(slugs))
    return tuple(sorted((pattern(s) for s in unique), key=lambda m: len(m.slug), reverse=True))


patterns = st.lists(
    st.builds(
        lambda pre, post: f"{pre}*{post}",
        st.text(alphabet="ab/-", max_size=4),
        st.text(alphabet="ab/-*", max_size=3),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None, database=None)
@given(patterns, st.lists(st.text(alphabet="ab/-*", max_size=9), min_size=1, max_size=8))
def test_index_finds_what_the_scan_found(slugs: list[str], asked: list[str]) -> None:
    models = ordered(slugs)
    index = WildcardIndex.build(models)
    for slug in asked:
        assert index.match(slug) is scan(models, slug)


def test_longest_pattern_wins_across_prefixes() -> None:
    models = ordered(["openai/*", "openai/gpt-*", "*-fast", "o*-mini"])
    index = WildcardIndex.build(models)
    found = index.match("openai/gpt-4o")
    assert found is not None and found.slug == "openai/gpt-*"
    assert index.match("openai/o1") is scan(models, "openai/o1")
    assert index.match("openai/o1-mini") is scan(models, "openai/o1-mini")
    assert index.match("x-fast") is scan(models, "x-fast")
    assert index.match("openai/") is None  # the star matches at least one character


def test_lookup_work_does_not_grow_with_the_number_of_patterns() -> None:
    """Dict lookups per match are bounded by distinct prefix and suffix lengths, so
    10,000 patterns under one prefix length cost one lookup per length."""
    many = ordered([f"team{i:05d}/*" for i in range(10_000)])
    index = WildcardIndex.build(many)
    assert index.prefix_lengths == (len("team00000/"),)
    lookups = 0
    real = index.by_prefix

    class Counting(dict):  # type: ignore[type-arg]
        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            nonlocal lookups
            lookups += 1
            return real.get(key, default)

    counted = WildcardIndex(Counting(), index.prefix_lengths)
    assert counted.match("team04242/gpt-4o") is not None
    assert lookups == 1


def test_a_model_template_puts_the_capture_inside_it() -> None:
    """SPEC §14: `claude-*` with `model: "claude-{*}"` passes Claude Code's names whole."""
    claude = Model(
        slug="claude-*",
        id="claude-*",
        name="claude-*",
        targets=(Target(PROVIDER, "claude-{*}", templated=True),),
    )
    bedrock = Target(PROVIDER, "anthropic.claude-{*}-v1:0", templated=True)
    assert claude.upstream_model(claude.targets[0], "claude-sonnet-4-5") == "claude-sonnet-4-5"
    assert claude.upstream_model(bedrock, "claude-haiku-4") == "anthropic.claude-haiku-4-v1:0"
    plain = pattern("openai/*")
    assert plain.upstream_model(plain.targets[0], "openai/gpt-4o") == "gpt-4o"  # as before
    fixed = Target(PROVIDER, "claude-{*}")  # not parsed as a template: taken as written
    assert claude.upstream_model(fixed, "claude-x") == "claude-{*}"
