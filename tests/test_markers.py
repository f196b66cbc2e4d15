"""The ``slow`` marker: set on every test that uses the real model, and a forgotten one fails."""

from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
ROOT_CONFTEST = Path(__file__).parents[1] / "conftest.py"  # the guard, for tests and doctests


def test_real_model_tests_are_marked_and_a_forgotten_mark_fails(pytester):
    tests_conftest = CONFTEST.read_text().replace("from __future__ import annotations\n", "")
    pytester.makeconftest(ROOT_CONFTEST.read_text() + "\n" + tests_conftest)
    pytester.makepyfile(
        test_inner="""
        import pytest
        import mechkit as mk

        @pytest.fixture(scope="module")
        def built_on_it(smollm2):
            return smollm2

        def test_fixture(smollm2):
            raise AssertionError("deselected: marked slow through the fixture")

        def test_fixture_of_a_fixture(built_on_it):
            raise AssertionError("deselected: marked slow through a module fixture")

        @pytest.mark.slow
        def test_marked():
            raise AssertionError("deselected: marked by hand")

        def test_forgot_the_mark():
            mk.load_model("smollm2-135m", device="cpu")

        def test_toy():
            assert mk.load_model("attn-only-2l", device="cpu").cfg.n_layers == 2
        """
    )
    result = pytester.runpytest("-m", "not slow", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, deselected=3)
    result.stdout.fnmatch_lines(["*test_forgot_the_mark loads a real model*not marked slow*"])
