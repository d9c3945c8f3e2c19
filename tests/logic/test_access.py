"""Serving access rules: keys fail closed, admin keys apart, reload stays inside its roots."""

from __future__ import annotations

import pytest

from lion_ray.config import ServeConfig
from lion_ray.engines.serving import REPLICA, configure_replica, resolve_access
from lion_ray.errors import LionError
from lion_ray.logic.access import Access, is_loopback, key_digest, read_key_digests, within


def test_configured_keys_that_are_missing_refuse_to_deploy():
    settings = ServeConfig(api_keys_env="LION_KEYS")
    for environ in ({}, {"LION_KEYS": " , "}):
        with pytest.raises(LionError, match=r"\$LION_KEYS, but it is not set") as err:
            resolve_access(settings, environ)
        assert "serve.api_keys_env" in str(err.value)
    admin_missing = ServeConfig(api_keys_env="LION_KEYS", admin_keys_env="LION_ADMIN")
    with pytest.raises(LionError, match=r"serve.admin_keys_env names \$LION_ADMIN"):
        resolve_access(admin_missing, {"LION_KEYS": "k1"})


def test_replicas_get_digests_never_the_keys():
    settings = ServeConfig(api_keys_env="LION_KEYS", admin_keys_env="LION_ADMIN")
    digests = resolve_access(settings, {"LION_KEYS": "k1, k2", "LION_ADMIN": "root"})
    assert digests == {
        "user": sorted([key_digest("k1"), key_digest("k2")]),
        "admin": [key_digest("root")],
    }
    assert "k1" not in repr(digests) and "root" not in repr(digests)


def test_a_replica_told_to_check_keys_but_given_none_refuses_to_start():
    settings = ServeConfig(api_keys_env="LION_KEYS")
    before = REPLICA["access"]
    for digests in (None, {"user": [], "admin": []}):
        with pytest.raises(LionError, match="refusing to serve without them"):
            configure_replica(settings, digests)
    assert REPLICA["access"] is before  # nothing half-installed


def test_an_open_server_binds_only_loopback_unless_allowed():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        assert resolve_access(ServeConfig(host=host), {}) == {"user": [], "admin": []}
    for host in ("0.0.0.0", "10.1.2.3", "::", "head.example"):
        assert not is_loopback(host)
        with pytest.raises(LionError, match="--allow-unauthenticated"):
            resolve_access(ServeConfig(host=host), {})
    assert resolve_access(ServeConfig(host="0.0.0.0", allow_unauthenticated=True), {})
    keyed = ServeConfig(host="0.0.0.0", api_keys_env="K")
    assert resolve_access(keyed, {"K": "k"})["user"]


def test_user_and_admin_checks():
    access = Access(user=frozenset({key_digest("u")}), admin=frozenset({key_digest("a")}))
    assert access.check_user("Bearer u") == 200 and access.check_user("Bearer a") == 200
    for header in ("", "Bearer ", "Bearer x", "u", "Basic u"):
        assert access.check_user(header) == 401
    assert access.check_admin("Bearer a") == (200, "")
    assert access.check_admin("Bearer u")[0] == 403
    assert access.check_admin("Bearer x")[0] == 401 and access.check_admin("")[0] == 401
    user_only = Access(user=frozenset({key_digest("u")}))
    status, reason = user_only.check_admin("Bearer u")
    assert status == 403 and "serve.admin_keys_env" in reason
    assert Access().check_user("") == 200 and Access().check_admin("")[0] == 200


def test_read_key_digests_strips_and_dedups():
    assert read_key_digests({"V": " a,a ,b,"}, "V", "api_keys_env") == sorted(
        [key_digest("a"), key_digest("b")]
    )


def test_reload_paths_stay_inside_their_roots(tmp_path):
    run = tmp_path / "run"
    (run / "round_2").mkdir(parents=True)
    roots = [str(run)]
    assert within(str(run / "round_2" / "imitation" / "model"), roots)
    assert within(str(run), roots)
    assert not within(str(tmp_path / "run-other" / "model"), roots)  # a prefix, not a parent
    assert not within(f"{run}/round_2/../../elsewhere", roots)
    assert not within("/etc", roots) and not within("/etc", [])
    (tmp_path / "link").symlink_to("/etc")
    assert not within(str(run / ".." / "link"), roots)
    s3 = ["s3://bucket/runs/demo"]
    assert within("s3://bucket/runs/demo/round_1/imitation/model", s3)
    assert not within("s3://bucket/runs/demo/../other/model", s3)
    assert not within("s3://bucket/runs/demo-2/model", s3)
    assert not within("gs://bucket/runs/demo/model", s3)
