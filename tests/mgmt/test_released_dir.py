"""Where a release keeps the disks a domain ran on (``cdp.msa.failback._move_images_aside``):
``<datastore>/+released/<name>-<time>/``, which no domain's folder can be. It used to be
``<datastore>/<name>.released-<time>/``, a valid domain name: a domain so named found
another domain's disks in its folder."""

from __future__ import annotations

import os
import stat

import pytest

from cdp.errors import ConfigError
from cdp.msa.failover import check_domain_name
from cdp.msa.failback import RELEASED_DIR, _move_images_aside


def test_released_disks_go_where_no_domain_can_be(tmp_path):
    (tmp_path / "erp").mkdir()
    (tmp_path / "erp" / "vm1-d0.img").write_bytes(b"disk")
    kept = _move_images_aside(tmp_path, "erp")
    assert kept.parent == tmp_path / RELEASED_DIR and kept.name.startswith("erp-")
    assert (kept / "vm1-d0.img").read_bytes() == b"disk" and not (tmp_path / "erp").exists()
    assert stat.S_IMODE(os.stat(tmp_path / RELEASED_DIR).st_mode) == 0o700
    with pytest.raises(ConfigError):
        check_domain_name(RELEASED_DIR)
    with pytest.raises(ConfigError):
        check_domain_name(f"{RELEASED_DIR}/erp")
    # A second release in the same second gets a name of its own.
    (tmp_path / "erp").mkdir()
    again = _move_images_aside(tmp_path, "erp")
    assert again != kept and again.parent == kept.parent
    assert _move_images_aside(tmp_path, "erp") is None  # nothing there: nothing moved


def test_a_planted_released_dir_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    datastore = tmp_path / "ds"
    datastore.mkdir()
    (datastore / "erp").mkdir()
    os.symlink(elsewhere, datastore / RELEASED_DIR)
    with pytest.raises(ConfigError, match=r"\+released: not a directory of this user's"):
        _move_images_aside(datastore, "erp")
    assert (datastore / "erp").is_dir() and list(elsewhere.iterdir()) == []
    os.unlink(datastore / RELEASED_DIR)
    (datastore / RELEASED_DIR).mkdir(mode=0o777)
    os.chmod(datastore / RELEASED_DIR, 0o777)  # others may write it: refused too
    with pytest.raises(ConfigError):
        _move_images_aside(datastore, "erp")
