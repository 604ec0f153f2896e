"""``iofilter_sim run``'s numeric options: finite and above zero, refused before anything
starts (``--flush-timeout nan`` made every NBD flush wait forever: NaN compared false with
every deadline; ``--duration nan`` or ``--rate-mb-s inf`` passed ``float`` too)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from iofilter_sim.__main__ import cli


@pytest.mark.parametrize("args", [
    ["--duration", "nan"], ["--duration", "-1"], ["--duration", "0"], ["--rate-mb-s", "inf"],
    ["--rate-mb-s", "nan"], ["--speed", "0"], ["--speed", "-inf"],
    ["--nbd", "127.0.0.1:0", "--flush-timeout", "nan"], ["--nbd", "127.0.0.1:0", "--flush-timeout", "0"],
])
def test_a_number_that_is_not_finite_and_positive_is_a_usage_error(tmp_path, args):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text("never read: the options are refused first\n")
    result = CliRunner().invoke(cli, ["run", str(cluster), *args], env={"CDP_SITE_SECRET": "s" * 32})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[-2]}'" in result.output, result.output
