"""Site configuration: defaults, validation messages, environment overrides, path resolution.

Every load_config call passes ``environ`` so the test does not depend on the caller's environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import (
    DEFAULT_IGNORE,
    PROJECT_ROOT,
    IngestSettings,
    LocalShareConfig,
    SmbShareConfig,
    apply_env_overrides,
    config_path_from_env,
    load_config,
    parse_config,
)
from tasks.errors import ConfigError, WorkflowError


def local(name: str = "ct-room1", source: str = "CT1", path: str = "/srv/ct", **extra) -> dict:
    return {"kind": "local", "name": name, "source": source, "path": path, **extra}


def smb(name: str = "mr-room2", source: str = "MR2", **extra) -> dict:
    return {"kind": "smb", "name": name, "source": source, "server": "fileserver", "share": "modality", **extra}


def write_config(folder: Path, data: object, name: str = "site.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / name
    file.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return file


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def problem_lines(message: str) -> list[str]:
    return [line for line in message.splitlines() if line.startswith("  - ")]


def assert_one_line_has(message: str, *fragments: str) -> None:
    assert any(all(f in line for f in fragments) for line in problem_lines(message)), message


# --- defaults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: parse_config(None), id="parse-none"),
        pytest.param(lambda tmp: parse_config({}), id="parse-empty"),
        pytest.param(lambda tmp: load_config(None, environ={}), id="load-no-file"),
        pytest.param(lambda tmp: load_config(write_config(tmp, ""), environ={}), id="load-empty-file"),
        pytest.param(lambda tmp: load_config(write_config(tmp, "# only a comment\n"), environ={}), id="load-comment"),
    ],
)
def test_defaults_have_one_local_inbox_share(make, tmp_path):
    cfg = make(tmp_path)
    assert cfg.shares is None
    [share] = cfg.all_shares
    assert isinstance(share, LocalShareConfig)
    assert (share.name, share.kind, share.source) == ("inbox", "local", "INBOX")
    assert share.path == cfg.data_dir / "inbox"
    assert cfg.share("inbox") == share


def test_default_values():
    cfg = load_config(None, environ={})
    assert cfg.data_dir == PROJECT_ROOT / "data"
    assert cfg.embedded_orthanc is True
    assert cfg.orthanc_url == "http://127.0.0.1:8142"
    assert cfg.orthanc_storage_dir == PROJECT_ROOT / "data" / "orthanc"
    assert cfg.prefect_home == PROJECT_ROOT / "data" / "prefect"
    assert cfg.ingest == IngestSettings()
    assert cfg.ingest.ignore == DEFAULT_IGNORE
    assert cfg.ingest.quarantine_folder == ".quarantine"
    assert cfg.ingest.conflict_policy == "warn"


@pytest.mark.parametrize("name", ["Thumbs.db", "desktop.ini", ".DS_Store", "~$*", "*.partial", "*.tmp"])
def test_default_ignore_patterns(name):
    assert name in IngestSettings().ignore


def test_default_ignore_list_is_not_shared_between_instances():
    a, b = IngestSettings(), IngestSettings()
    a.ignore.append("*.bak")
    assert "*.bak" not in b.ignore
    assert "*.bak" not in DEFAULT_IGNORE


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", "http://127.0.0.1:8142"),
        ("https://pacs:8042", "https://pacs:8042"),
        ("https://pacs:8042/", "https://pacs:8042"),
        ("https://host/orthanc//", "https://host/orthanc"),
    ],
)
def test_orthanc_url(url, expected):
    cfg = parse_config({"orthanc": {"url": url}})
    assert cfg.orthanc_url == expected
    assert cfg.embedded_orthanc is (url == "")


# --- validation -------------------------------------------------------------------------------------------

UNKNOWN_KEYS = [
    pytest.param({"nope": 1}, ("nope",), id="top-level"),
    pytest.param({"orthanc": {"urll": "x"}}, ("orthanc.urll",), id="orthanc"),
    pytest.param({"ingest": {"intervall_seconds": 2}}, ("ingest.intervall_seconds",), id="ingest"),
    pytest.param({"local_orthanc": {"http_prt": 1}}, ("local_orthanc.http_prt",), id="local-orthanc"),
    pytest.param({"prefect": {"prot": 1}}, ("prefect.prot",), id="prefect"),
    pytest.param({"shares": [local(colour="red")]}, ("shares.0", "colour"), id="local-share"),
    pytest.param({"shares": [local(), smb(folder_name="x")]}, ("shares.1", "folder_name"), id="second-share-smb"),
    pytest.param({"shares": [local(ingest={"bogus": 1})]}, ("shares.0", "ingest.bogus"), id="share-ingest"),
]


@pytest.mark.parametrize(("data", "fragments"), UNKNOWN_KEYS)
def test_unknown_keys_are_reported_with_their_path(data, fragments):
    message = config_error(data)
    assert "1 problem(s)" in message
    assert_one_line_has(message, *fragments, "unknown key")


PASSWORD_PLACES = [
    pytest.param({"password": "s3cr3t-pw"}, "(top level)", id="top-level"),
    pytest.param({"orthanc": {"username": "u", "password": "s3cr3t-pw"}}, "orthanc", id="orthanc"),
    pytest.param({"shares": [local(password="s3cr3t-pw")]}, "shares.0", id="local-share"),
    pytest.param({"shares": [smb(username="u", password="s3cr3t-pw")]}, "shares.0", id="smb-share"),
    pytest.param({"shares": [local(), smb(password="s3cr3t-pw")]}, "shares.1", id="second-share"),
    pytest.param({"ingest": {"password": "s3cr3t-pw"}}, "ingest", id="ingest"),
    pytest.param({"shares": [smb(ingest={"password": "s3cr3t-pw"})]}, "ingest", id="share-ingest"),
    pytest.param({"local_orthanc": {"password": "s3cr3t-pw"}}, "local_orthanc", id="local-orthanc"),
    pytest.param({"prefect": {"password": "s3cr3t-pw"}}, "prefect", id="prefect"),
    pytest.param({"orthanc": {"password": None}}, "orthanc", id="even-empty"),
]


@pytest.mark.parametrize(("data", "where"), PASSWORD_PLACES)
def test_inline_password_is_rejected_anywhere(data, where):
    message = config_error(data)
    assert_one_line_has(message, where, "password_env", "password_secret_block")
    assert "s3cr3t-pw" not in message  # the secret itself is never echoed


@pytest.mark.parametrize(
    ("data", "where"),
    [
        pytest.param({"orthanc": {"password_env": "PW", "password_secret_block": "pw"}}, "orthanc", id="orthanc"),
        pytest.param({"shares": [smb(password_env="PW", password_secret_block="pw")]}, "shares.0", id="smb-share"),
        pytest.param({"shares": [local(password_env="PW", password_secret_block="pw")]}, "shares.0", id="local"),
    ],
)
def test_password_env_and_secret_block_together_are_rejected(data, where):
    assert_one_line_has(config_error(data), where, "not both")


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"username": "u"},
        {"username": "u", "password_env": "ORTHANC_PW"},
        {"username": "u", "password_secret_block": "orthanc-pw"},
    ],
)
def test_one_password_source_or_none_is_accepted(credentials):
    cfg = parse_config({"orthanc": {"url": "https://pacs", **credentials}, "shares": [smb(**credentials)]})
    for holder in (cfg.orthanc, cfg.share("mr-room2")):
        assert holder.password_env == credentials.get("password_env")
        assert holder.password_secret_block == credentials.get("password_secret_block")


BAD_SHARE_NAMES = ["CT-Room1", "Ct", "-ct", "ct_room1", "", "ct room", "ct.room", "ct/room", "a" * 42, "ct-räum"]
GOOD_SHARE_NAMES = ["a", "0", "ct", "ct-room1", "1-2-3", "ct-", "a" * 41]


@pytest.mark.parametrize("name", BAD_SHARE_NAMES)
def test_bad_share_names_are_rejected(name):
    message = config_error({"shares": [local(name=name)]})
    assert_one_line_has(message, "shares.0", "share name must be lower-case letters, digits and dashes")


@pytest.mark.parametrize("name", GOOD_SHARE_NAMES)
def test_good_share_names_are_accepted(name):
    assert parse_config({"shares": [local(name=name)]}).share(name).name == name


@pytest.mark.parametrize(
    ("shares", "repeated"),
    [
        pytest.param([local(name="ct"), local(name="ct", path="/other")], "ct", id="two-local"),
        pytest.param([local(name="ct"), smb(name="ct")], "ct", id="local-and-smb"),
        pytest.param([local(name="a"), local(name="b"), local(name="a"), local(name="b")], "a, b", id="two-repeated"),
    ],
)
def test_duplicate_share_names_are_rejected(shares, repeated):
    message = config_error({"shares": shares})
    assert_one_line_has(message, "unique", f"repeated: {repeated}")


@pytest.mark.parametrize(
    ("source", "ok"),
    [("CT1", True), ("A" * 64, True), ("", False), ("   ", False), ("A" * 65, False)],
)
def test_share_source(source, ok):
    data = {"shares": [local(source=source)]}
    if ok:
        assert parse_config(data).share("ct-room1").source == source
    else:
        assert_one_line_has(config_error(data), "shares.0", "source must be a non-empty name")


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        pytest.param({"shares": [{"kind": "local", "name": "ct", "source": "CT"}]}, ("shares.0", "path"), id="path"),
        pytest.param(
            {"shares": [{"kind": "smb", "name": "x", "source": "X", "share": "s"}]},
            ("shares.0", "server"),
            id="smb-server",
        ),
        pytest.param({"shares": [{"kind": "ftp", "name": "x", "source": "X"}]}, ("shares.0",), id="unknown-kind"),
        pytest.param({"orthanc": {"timeout_seconds": 0}}, ("orthanc.timeout_seconds",), id="timeout-zero"),
        pytest.param({"local_orthanc": {"http_port": 70000}}, ("local_orthanc.http_port",), id="port"),
        pytest.param({"ingest": {"parallel_uploads": 0}}, ("ingest.parallel_uploads",), id="parallel"),
        pytest.param({"ingest": {"window_seconds": 5}}, ("ingest.window_seconds",), id="window"),
        pytest.param({"ingest": {"conflict_policy": "delete"}}, ("ingest.conflict_policy",), id="policy"),
        pytest.param(
            {"ingest": {"quarantine_folder": "../outside"}},
            ("ingest.quarantine_folder", "inside the share"),
            id="quarantine-dotdot",
        ),
        pytest.param({"ingest": {"quarantine_folder": "/"}}, ("ingest.quarantine_folder",), id="quarantine-root"),
        pytest.param(
            {"shares": [local(ingest={"min_age_seconds": -1})]},
            ("shares.0", "min_age_seconds"),
            id="share-override-range",
        ),
    ],
)
def test_bad_values_are_reported_with_their_path(data, fragments):
    assert_one_line_has(config_error(data), *fragments)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (".quarantine", ".quarantine"),
        ("/q/", "q"),
        ("a\\b", "a/b"),
        ("a//b/", "a/b"),
        ("rejected/2024", "rejected/2024"),
    ],
)
def test_quarantine_folder_is_normalised(value, expected):
    assert parse_config({"ingest": {"quarantine_folder": value}}).ingest.quarantine_folder == expected


def test_all_problems_are_listed_in_one_error():
    data = {
        "orthanc": {"password_env": "PW", "password_secret_block": "pw"},
        "local_orthanc": {"http_prt": 1},
        "ingest": {"parallel_uploads": 99},
        "shares": [local(name="Bad_Name"), smb(password="s3cr3t-pw")],
    }
    message = config_error(data)
    assert "5 problem(s)" in message
    lines = problem_lines(message)
    assert len(lines) == 5
    assert_one_line_has(message, "local_orthanc.http_prt", "unknown key")
    assert_one_line_has(message, "orthanc", "not both")
    assert_one_line_has(message, "ingest.parallel_uploads")
    assert_one_line_has(message, "shares.0", "share name must be")
    assert_one_line_has(message, "shares.1", "password_env")


def test_config_error_is_a_workflow_error():
    with pytest.raises(WorkflowError):
        parse_config({"nope": 1})


def test_unknown_share_lookup_names_the_configured_ones():
    cfg = parse_config({"shares": [local(name="ct"), smb(name="mr")]})
    with pytest.raises(ConfigError, match=r"no share named 'us'.*configured: ct, mr"):
        cfg.share("us")


def test_smb_share_defaults():
    share = parse_config({"shares": [smb()]}).share("mr-room2")
    assert isinstance(share, SmbShareConfig)
    assert (share.port, share.folder, share.domain, share.encrypt) == (445, "", None, False)


def test_empty_share_list_means_no_shares():
    cfg = parse_config({"shares": []})
    assert cfg.all_shares == []
    with pytest.raises(ConfigError, match="configured: none"):
        cfg.share("inbox")


# --- environment overrides --------------------------------------------------------------------------------

SITE = {
    "orthanc": {"url": "http://old:8042", "username": "ingest"},
    "ingest": {"interval_seconds": 2},
    "shares": [
        smb(name="ct-room1", source="CT1", folder="outgoing"),
        local(name="mr", source="MR", path="/srv/mr"),
    ],
}

ENV_OVERRIDES = [
    pytest.param({"OWF__ORTHANC__URL": "https://pacs:8042"}, lambda c: c.orthanc.url, "https://pacs:8042", id="url"),
    pytest.param({"owf__orthanc__url": "https://pacs"}, lambda c: c.orthanc.url, "https://pacs", id="lower-case"),
    pytest.param({"Owf__Orthanc__Url": "https://pacs"}, lambda c: c.orthanc.url, "https://pacs", id="mixed-case"),
    pytest.param({"OWF__ORTHANC__VERIFY_TLS": "false"}, lambda c: c.orthanc.verify_tls, False, id="yaml-bool"),
    pytest.param({"OWF__ORTHANC__TIMEOUT_SECONDS": "5"}, lambda c: c.orthanc.timeout_seconds, 5.0, id="number"),
    pytest.param({"OWF__ORTHANC__USERNAME": ""}, lambda c: c.orthanc.username, "", id="empty-string"),
    pytest.param({"OWF__INGEST__MIN_AGE_SECONDS": "3.5"}, lambda c: c.ingest.min_age_seconds, 3.5, id="ingest"),
    pytest.param(
        {"OWF__LOCAL_ORTHANC__HTTP_PORT": "9000"}, lambda c: c.orthanc_url, "http://old:8042", id="new-section-key"
    ),
    pytest.param(
        {"OWF__SHARES__CT_ROOM1__FOLDER": "incoming"},
        lambda c: c.share("ct-room1").folder,
        "incoming",
        id="share-by-name",
    ),
    pytest.param(
        {"OWF__SHARES__CT_ROOM1__FOLDER": "incoming"},
        lambda c: c.share("mr").path,
        Path("/srv/mr"),
        id="other-share-untouched",
    ),
    pytest.param(
        {"OWF__SHARES__MR__PATH": "/mnt/mr"}, lambda c: c.share("mr").path, Path("/mnt/mr"), id="local-share-path"
    ),
    pytest.param(
        {"OWF__SHARES__CT_ROOM1__PASSWORD_ENV": "CT_PW"},
        lambda c: c.share("ct-room1").password_env,
        "CT_PW",
        id="share-password-env",
    ),
    pytest.param(
        {"OWF__SHARES__CT_ROOM1__INGEST__MIN_AGE_SECONDS": "10"},
        lambda c: c.share("ct-room1").ingest.min_age_seconds,
        10.0,
        id="share-ingest-override",
    ),
    pytest.param(
        {"OWF__SHARES__CT_ROOM1__INGEST__MIN_AGE_SECONDS": "10"},
        lambda c: c.ingest_for(c.share("ct-room1")).min_age_seconds,
        10.0,
        id="share-ingest-merged",
    ),
    pytest.param(
        {"HOME": "/root", "OWF_X": "1", "XOWF__ORTHANC__URL": "x"},
        lambda c: c.orthanc.url,
        "http://old:8042",
        id="other-variables-ignored",
    ),
    pytest.param({"OWF_DATA_DIR": "/var/owf"}, lambda c: c.data_dir, Path("/var/owf"), id="owf-data-dir"),
    pytest.param({"OWF__DATA_DIR": "/var/owf2"}, lambda c: c.data_dir, Path("/var/owf2"), id="data-dir-override"),
]


@pytest.mark.parametrize(("environ", "get", "expected"), ENV_OVERRIDES)
def test_env_overrides_via_load_config(environ, get, expected, tmp_path):
    cfg = load_config(write_config(tmp_path, SITE), environ=environ)
    assert get(cfg) == expected


def test_owf_config_variable_names_the_file(tmp_path):
    file = write_config(tmp_path, {"orthanc": {"url": "https://from-file"}})
    assert load_config(None, environ={"OWF_CONFIG": str(file)}).orthanc.url == "https://from-file"
    assert config_path_from_env({"OWF_CONFIG": f"  {file}  "}) == file
    assert config_path_from_env({"OWF_CONFIG": "   "}) is None
    assert config_path_from_env({}) is None


def test_explicit_path_wins_over_owf_config(tmp_path):
    a = write_config(tmp_path / "a", {"orthanc": {"url": "https://a"}})
    b = write_config(tmp_path / "b", {"orthanc": {"url": "https://b"}})
    assert load_config(a, environ={"OWF_CONFIG": str(b)}).orthanc.url == "https://a"


def test_owf_data_dir_does_not_override_the_file(tmp_path):
    file = write_config(tmp_path, {"data_dir": "/from/file"})
    assert load_config(file, environ={"OWF_DATA_DIR": "/from/env"}).data_dir == Path("/from/file")


def test_env_override_beats_the_file_and_keeps_the_rest(tmp_path):
    cfg = load_config(write_config(tmp_path, SITE), environ={"OWF__ORTHANC__URL": "https://new"})
    assert cfg.orthanc.url == "https://new"
    assert cfg.orthanc.username == "ingest"
    assert [s.name for s in cfg.all_shares] == ["ct-room1", "mr"]


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        pytest.param({"OWF__SHARES__CT_ROOM2__FOLDER": "x"}, "'ct-room2', which is not configured", id="unknown-share"),
        pytest.param({"OWF__SHARES__NOPE__INGEST__MIN_AGE_SECONDS": "1"}, "'nope'", id="unknown-share-deep"),
        pytest.param({"OWF__ORTHANC__URL__HOST": "x"}, "does not name a setting", id="below-a-value"),
        pytest.param({"OWF__NOPE": "1"}, "nope: unknown key", id="unknown-section"),
        pytest.param({"OWF__ORTHANC__URLL": "x"}, "orthanc.urll: unknown key", id="unknown-key"),
        pytest.param({"OWF__SHARES__CT_ROOM1__PASSWORD": "pw"}, "password_secret_block", id="inline-password"),
        pytest.param({"OWF__INGEST__PARALLEL_UPLOADS": "100"}, "ingest.parallel_uploads", id="out-of-range"),
    ],
)
def test_bad_env_overrides_raise_config_error(environ, fragment, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, SITE), environ=environ)
    assert fragment in str(exc.value)


def test_env_override_naming_a_share_without_any_configured():
    with pytest.raises(ConfigError, match="'ct-room1', which is not configured"):
        load_config(None, environ={"OWF__SHARES__CT_ROOM1__FOLDER": "x"})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {"orthanc": {"url": "a"}}),
        ({"OWF__ORTHANC__URL": "b"}, {"orthanc": {"url": "b"}}),
        ({"OWF__ORTHANC__VERIFY_TLS": "no"}, {"orthanc": {"url": "a", "verify_tls": False}}),
        ({"OWF__ORTHANC__TIMEOUT_SECONDS": "30"}, {"orthanc": {"url": "a", "timeout_seconds": 30}}),
        ({"OWF__INGEST__MIN_AGE_SECONDS": "0.5"}, {"orthanc": {"url": "a"}, "ingest": {"min_age_seconds": 0.5}}),
        ({"OWF__ORTHANC__USERNAME": ""}, {"orthanc": {"url": "a", "username": ""}}),
        ({"OWF____ORTHANC____URL": "c"}, {"orthanc": {"url": "c"}}),
        ({"OWF__": "x"}, {"orthanc": {"url": "a"}}),
    ],
)
def test_apply_env_overrides_parses_yaml_scalars(environ, expected):
    assert apply_env_overrides({"orthanc": {"url": "a"}}, environ) == expected


def test_apply_env_overrides_addresses_shares_by_name():
    data = {"shares": [{"name": "ct-room1", "folder": "a"}, {"name": "mr", "folder": "b"}]}
    out = apply_env_overrides(data, {"OWF__SHARES__CT_ROOM1__FOLDER": "incoming", "OWF__SHARES__MR__PORT": "4450"})
    assert out["shares"] == [{"name": "ct-room1", "folder": "incoming"}, {"name": "mr", "folder": "b", "port": 4450}]


# --- relative paths ---------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path):
    folder = tmp_path / "etc" / "owf"
    file = write_config(
        folder,
        {
            "data_dir": "state",
            "orthanc": {"url": "https://pacs", "ca_bundle": "certs/ca.pem"},
            "local_orthanc": {"storage_dir": "../orthanc-db"},
            "prefect": {"home": "prefect-home"},
            "shares": [local(name="ct", path="inbox/ct"), local(name="abs", path="/srv/abs"), smb(folder="in/ct")],
        },
    )
    cfg = load_config(file, environ={})
    assert cfg.data_dir == folder / "state"
    assert cfg.orthanc.ca_bundle == folder / "certs" / "ca.pem"
    assert cfg.orthanc_storage_dir == tmp_path / "etc" / "orthanc-db"
    assert cfg.prefect_home == folder / "prefect-home"
    assert cfg.share("ct").path == folder / "inbox" / "ct"
    assert cfg.share("abs").path == Path("/srv/abs")
    assert cfg.share("mr-room2").folder == "in/ct"  # a folder inside an SMB share is not a local path


def test_default_inbox_follows_a_relative_data_dir(tmp_path):
    cfg = load_config(write_config(tmp_path, {"data_dir": "d"}), environ={})
    assert cfg.all_shares[0].path == tmp_path / "d" / "inbox"
    assert cfg.orthanc_storage_dir == tmp_path / "d" / "orthanc"
    assert cfg.prefect_home == tmp_path / "d" / "prefect"


def test_relative_path_config_file_argument(tmp_path, monkeypatch):
    write_config(tmp_path / "conf", {"data_dir": "state"})
    monkeypatch.chdir(tmp_path)
    assert load_config("conf/site.yaml", environ={}).data_dir == tmp_path / "conf" / "state"


def test_relative_owf_data_dir_without_a_file_is_taken_from_the_project_root():
    assert load_config(None, environ={"OWF_DATA_DIR": "var"}).data_dir == PROJECT_ROOT / "var"


@pytest.mark.parametrize(
    ("base", "expected"),
    [(None, Path("rel/inbox")), (Path("/base"), Path("/base/rel/inbox"))],
)
def test_parse_config_resolves_only_with_a_base_dir(base, expected):
    cfg = parse_config({"shares": [local(path="rel/inbox")]}, base)
    assert cfg.share("ct-room1").path == expected


# --- per-share ingest settings ----------------------------------------------------------------------------


def test_ingest_for_merges_share_overrides_over_the_global_settings():
    cfg = parse_config(
        {
            "ingest": {"interval_seconds": 5, "min_age_seconds": 1, "parallel_uploads": 8},
            "shares": [
                local(name="ct", ingest={"min_age_seconds": 30, "ignore": ["*.bak"], "conflict_policy": "quarantine"}),
                local(name="plain", path="/srv/plain"),
            ],
        }
    )
    ct = cfg.ingest_for(cfg.share("ct"))
    assert (ct.interval_seconds, ct.min_age_seconds, ct.parallel_uploads) == (5.0, 30.0, 8)
    assert ct.ignore == ["*.bak"]
    assert ct.conflict_policy == "quarantine"
    assert ct.quarantine_folder == ".quarantine"
    assert cfg.ingest_for(cfg.share("plain")) == cfg.ingest
    assert cfg.ingest.min_age_seconds == 1.0  # the global settings are not changed
    assert cfg.ingest.ignore == DEFAULT_IGNORE


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ({"interval_seconds": 0.5}, "interval_seconds", 0.5),
        ({"window_seconds": 60}, "window_seconds", 60),
        ({"handover_seconds": 0}, "handover_seconds", 0),
        ({"min_age_seconds": 0}, "min_age_seconds", 0.0),
        ({"parallel_uploads": 1}, "parallel_uploads", 1),
        ({"stream_threshold_bytes": 0}, "stream_threshold_bytes", 0),
        ({"max_files_per_batch": 10}, "max_files_per_batch", 10),
        ({"backoff_max_seconds": 5}, "backoff_max_seconds", 5.0),
        ({"ignore": []}, "ignore", []),
        ({"conflict_policy": "warn"}, "conflict_policy", "warn"),
        ({}, "interval_seconds", 7.0),
    ],
)
def test_ingest_for_each_override(override, field, expected):
    cfg = parse_config(
        {"ingest": {"interval_seconds": 7, "conflict_policy": "quarantine"}, "shares": [smb(ingest=override)]}
    )
    assert getattr(cfg.ingest_for(cfg.share("mr-room2")), field) == expected


# --- the file itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("- a\n- b\n", "must hold a mapping", id="list"),
        pytest.param("just a string\n", "must hold a mapping", id="string"),
        pytest.param("42\n", "must hold a mapping", id="number"),
        pytest.param("orthanc: [\n", "is not valid YAML", id="broken-yaml"),
        pytest.param("orthanc:\n  url: a\n url: b\n", "is not valid YAML", id="bad-indent"),
        pytest.param("orthanc:\n  urll: a\n", "orthanc.urll: unknown key", id="unknown-key"),
        pytest.param("orthanc:\n  password: hunter2\n", "password_env", id="inline-password"),
    ],
)
def test_bad_config_files(text, fragment, tmp_path):
    file = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(file, environ={})
    assert fragment in str(exc.value)
    assert "hunter2" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_missing_file_named_by_owf_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(None, environ={"OWF_CONFIG": str(tmp_path / "absent.yaml")})


def test_a_full_config_file_round_trips(tmp_path):
    file = write_config(
        tmp_path,
        "orthanc:\n"
        "  url: https://pacs.example:8042\n"
        "  username: ingest\n"
        "  password_env: ORTHANC_PASSWORD\n"
        "ingest:\n"
        "  min_age_seconds: 2\n"
        "shares:\n"
        "  - name: ct-room1\n"
        "    kind: smb\n"
        "    source: CT1\n"
        "    server: fs01\n"
        "    share: modality\n"
        "    username: svc\n"
        "    password_secret_block: ct-room1-pw\n"
        "  - name: inbox\n"
        "    kind: local\n"
        "    source: INBOX\n"
        "    path: inbox\n",
    )
    cfg = load_config(file, environ={})
    assert cfg.orthanc.password_env == "ORTHANC_PASSWORD"
    ct = cfg.share("ct-room1")
    assert isinstance(ct, SmbShareConfig)
    assert (ct.server, ct.share, ct.username, ct.password_secret_block) == ("fs01", "modality", "svc", "ct-room1-pw")
    assert cfg.share("inbox").path == tmp_path / "inbox"
    assert cfg.ingest_for(ct).min_age_seconds == 2.0


@pytest.mark.parametrize("folder", ["../../etc", "..", "/", "a/../../b"])
def test_per_share_quarantine_folder_must_stay_inside_the_share(folder):
    with pytest.raises(ConfigError) as err:
        parse_config({"shares": [{"kind": "local", "name": "ct", "source": "CT", "path": "/srv/ct",
                                  "ingest": {"quarantine_folder": folder}}]})  # fmt: skip
    assert "quarantine_folder" in str(err.value)


def test_per_share_quarantine_folder_is_normalised():
    cfg = parse_config({"shares": [{"name": "ct", "source": "CT", "path": "/srv/ct",
                                    "ingest": {"quarantine_folder": "a\\b/"}}]})  # fmt: skip
    assert cfg.ingest_for(cfg.share("ct")).quarantine_folder == "a/b"


@pytest.mark.parametrize("name", ["ct\n", "ct\nx", " ct", "ct "])
def test_share_names_with_line_breaks_or_spaces_are_rejected(name):
    with pytest.raises(ConfigError):
        parse_config({"shares": [{"kind": "local", "name": name, "source": "CT", "path": "/srv/ct"}]})


def test_env_override_naming_a_share_but_no_setting_is_a_config_error():
    data = {"shares": [{"kind": "local", "name": "ct-room1", "source": "CT", "path": "/srv"}]}
    with pytest.raises(ConfigError) as err:
        apply_env_overrides(data, {"OWF__SHARES__CT_ROOM1": "x"})
    assert "names no setting" in str(err.value)


@pytest.mark.parametrize(
    "share, kind",
    [({"name": "a", "source": "A", "path": "/srv/a"}, "local"),
     ({"name": "b", "source": "B", "server": "fs1", "share": "dicom"}, "smb")],
)  # fmt: skip
def test_share_kind_may_be_left_out(share, kind):
    assert parse_config({"shares": [share]}).all_shares[0].kind == kind


def test_the_documented_example_config_is_valid_and_complete():
    """deployments/site.example.yaml documents every key: it must parse, and name every setting there is."""
    from tasks.config import (
        PROJECT_ROOT,
        IngestSettings,
        LocalOrthancConfig,
        OrthancConfig,
        PrefectConfig,
        ReportSettings,
        WatchSettings,
    )
    from tasks.hl7_settings import Hl7Settings
    from tasks.routing_config import AnonymizeSpec, Destination, ModifySpec, Route, RouteWhen, RoutingSettings

    path = PROJECT_ROOT / "deployments" / "site.example.yaml"
    cfg = load_config(path, environ={})
    assert [s.name for s in cfg.all_shares] == ["inbox", "ct-room1"]
    doc = yaml.safe_load(path.read_text())
    for section, model in [("orthanc", OrthancConfig), ("local_orthanc", LocalOrthancConfig),
                           ("prefect", PrefectConfig), ("ingest", IngestSettings), ("watch", WatchSettings),
                           ("report", ReportSettings), ("hl7", Hl7Settings),
                           ("routing", RoutingSettings)]:  # fmt: skip
        assert set(doc[section]) == set(model.model_fields), section
    assert set().union(*(d.keys() for d in doc["destinations"])) == set(Destination.model_fields)
    first = doc["routes"][0]
    assert set(first) == set(Route.model_fields) - {"anonymize"}
    assert set(first["when"]) == set(RouteWhen.model_fields)
    assert set(first["modify"]) == set(ModifySpec.model_fields)
    assert set(doc["routes"][1]["anonymize"]) == set(AnonymizeSpec.model_fields)
