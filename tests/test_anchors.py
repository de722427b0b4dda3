"""`fluidbench bench --anchor-configs`: the options that need no anchor checkout (none is here, none is needed)."""
from __future__ import annotations

import pytest

from harness import anchors, cli


@pytest.mark.parametrize("args, field", [(["--mar-root", "/nowhere"], "--anchor-configs"),
                                         (["--anchor-configs", "--mar-root", "/nowhere"], "--mar-root"),
                                         (["--anchor-configs", "--llamagen-root", "/nowhere"], "--llamagen-root")])
def test_anchor_options_are_one_line_errors(args, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and field in err and "\n" not in err


def test_ours_at_the_anchor_configuration_matches_the_issue():
    """~1.35M parameters, 64 tokens, guidance 2 and 16 / 50 steps (issue 14's configuration)."""
    for name in ("kl-random", "vq-raster"):
        v = anchors.build_ours(name)
        assert 1.3e6 < v.param_counts()["total"] < 1.45e6
        assert v.seq_len == 64 and v.defaults["cfg_scale"] == 2.0
    kl = anchors.build_ours("kl-random")
    assert kl.defaults["steps"] == 16 and kl.defaults["head_steps"] == 50  # raster always takes 64 steps
