"""``bdrun gallery``: one row per attack, clean / backdoored / amplified difference."""
from __future__ import annotations

import matplotlib.image as mpimg
import pytest

from bdbench_cli.main import main


def test_gallery_writes_one_row_per_attack(tmp_path, capsys):
    one = tmp_path / "one.png"
    two = tmp_path / "two.png"
    for out, attacks in ((one, "badnets"), (two, "badnets,blended")):
        main(["gallery", "--attacks", attacks, "--out", str(out)])  # returns normally on success
    assert capsys.readouterr().out.strip().splitlines() == [str(one), str(two)]
    h1, h2 = mpimg.imread(one).shape[0], mpimg.imread(two).shape[0]
    assert h2 > 1.7 * h1  # a second row


def test_gallery_rejects_unknown_attacks_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gallery", "--attacks", "badnets,wanett", "--out", str(tmp_path / "g.png")])
    assert exc.value.code == 2 and "unknown attack 'wanett'" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
